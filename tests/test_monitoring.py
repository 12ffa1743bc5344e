"""The monitoring overlay: every metric its dashboard and alerts query is served by a running dnsmirror."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from dns_support import dnsmirror_serve, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "manifests" / "monitoring"
METRIC = re.compile(r"\bdnsmirror_[a-z0-9_]+")


def queried_metrics() -> dict[str, set[str]]:
    """Metric names in the dashboard's and the rules' expressions, by file."""
    dashboard = json.loads((MONITORING / "dnsmirror-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [variable.get("query", "") for variable in dashboard["templating"]["list"]]
    (rule,) = yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text())
    alerts = [entry["expr"] for group in rule["spec"]["groups"] for entry in group["rules"]]
    return {"dashboard": {m for e in expressions for m in METRIC.findall(str(e))},
            "rules": {m for e in alerts for m in METRIC.findall(e)}}


def exposed_names(text: str) -> set[str]:
    """Every sample name /metrics can carry: the samples present, and those each TYPE line implies."""
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total")
            names |= {
                "counter": {base + "_total"},
                "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
                "gauge": {name},
            }.get(kind, {name})
    return names


def test_the_overlay_lists_its_files_and_builds():
    (kustomization,) = yaml.safe_load_all((MONITORING / "kustomization.yaml").read_text())
    present = {p.name for p in MONITORING.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == present
    alerts = {
        entry["alert"]
        for group in yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]["groups"]
        for entry in group["rules"]
    }
    assert {"DnsmirrorFailingOpen", "DnsmirrorUpstreamErrors", "DnsmirrorCacheNearlyFull",
            "DnsmirrorPeersFailing", "DnsmirrorConnectionsRefused", "DnsmirrorPeersTLSDiffers",
            "DnsmirrorDnsServfail", "DnsmirrorDnsAnswersUnsent"} <= alerts
    if shutil.which("kubectl"):
        built = subprocess.run(
            ["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60
        )
        assert built.returncode == 0, built.stderr
        kinds = {doc["kind"] for doc in yaml.safe_load_all(built.stdout)}
        assert kinds == {"ConfigMap", "Service", "ServiceMonitor", "PrometheusRule"}


def test_every_metric_the_dashboard_and_rules_query_is_served(tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is needed")
    ca_dir = tmp_path / "ca"
    subprocess.run([sys.executable, "-m", "dnsmirror", "ca", "init", "--dir", str(ca_dir)], check=True,
                   capture_output=True, timeout=60)
    https_port, metrics_port, dead_resolver = free_port(), free_port(), free_port()
    overrides = {
        "https": {"listen": [f"127.0.0.1:{https_port}"]},
        "health": {"interval": "200ms", "timeout": "100ms", "targets": []},
        "tls": {"ca_cert": str(ca_dir / "ca.crt"), "ca_key": str(ca_dir / "ca.key")},
        "cache": {"dir": str(tmp_path / "cache")},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        # a resolver that never answers: upstream fails on loopback, nothing leaves the machine
        "upstream": {"resolvers": [f"127.0.0.1:{dead_resolver}"]},
        "dns": {"timeout": "300ms"},
        "log": {"format": "json"},
    }

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    with dnsmirror_serve(tmp_path, overrides) as (_, process, log):
        assert wait_until(lambda: "dnsmirror_mirror_healthy 1.0" in scrape(), 10), log.read_text()
        curl = subprocess.run(
            [
                "curl",
                "-sk",
                "--max-time",
                "10",
                "--resolve",
                f"ghcr.io:{https_port}:127.0.0.1",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"https://ghcr.io:{https_port}/v2/team/app/blobs/sha256:{'a' * 64}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert curl.stdout == "502", (curl.stdout, curl.stderr, log.read_text())
        assert wait_until(
            lambda: (
                'dnsmirror_http_requests_total{method="GET",source="upstream",status_class="5xx"}' in scrape()
            ),
            5,
        ), scrape()
        text = scrape()
        lines = log.read_text()
    names = exposed_names(text)
    for where, queried in queried_metrics().items():
        assert queried, where
        missing = queried - names
        assert not missing, f"{where} queries metrics dnsmirror does not serve: {sorted(missing)}"
    # one change of health (failing open -> capturing) reads 1, not 2
    assert re.search(r"^dnsmirror_health_changes_total 1\.0$", text, re.MULTILINE), text
    assert re.search(r'^dnsmirror_upstream_errors_total\{kind="dns"\} [1-9]', text, re.MULTILINE), text
    assert re.search(r'^dnsmirror_build_info\{python="[0-9.]+",version="[^"]+"\} 1\.0$', text, re.MULTILINE)
    # the failure is one warning line with host, repository and kind; the start line carries the version
    records = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    failures = [r for r in records if r.get("event") == "upstream_failure"]
    assert len(failures) == 1 and failures[0]["level"] == "warning", failures
    assert (failures[0]["host"], failures[0]["repository"], failures[0]["kind"]) == (
        "ghcr.io",
        "team/app",
        "dns",
    )
    from dnsmirror import __version__
    assert any(r.get("message") == "dnsmirror started" and r.get("version") == __version__ for r in records)
    access = [r for r in records if r.get("event") == "access"]
    assert access and access[-1]["source"] == "upstream" and access[-1]["status"] == 502
