"""The DNS server as a real process, queried with real dig, forwarding to a real unbound on loopback."""

from __future__ import annotations

import shutil
import time

import pytest
from dns_support import (
    capturing_mirror,
    dig,
    dig_answers,
    dig_flags,
    dig_status,
    dnsmirror_serve,
    free_port,
    silent_udp_server,
    tcp_listener,
    unbound,
    wait_until,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("dig"), reason="dig is not installed (scripts/setup.sh installs it)"),
]

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
BIG_TXT = [f'big.example.test. 300 IN TXT "{str(i) * 100}"' for i in range(10)]
RECORDS = [
    "www.example.test. 300 IN A 192.0.2.10",
    "alias.example.test. 300 IN CNAME www.example.test.",
    "alias2.example.test. 300 IN CNAME alias.example.test.",
    f"{ECR}. 300 IN A 192.0.2.99",
    f"{ECR}. 300 IN MX 10 mail.example.test.",
    *BIG_TXT,
]


@pytest.fixture
def upstream(tmp_path):
    with unbound(tmp_path, RECORDS) as port:
        yield port


@pytest.fixture
def healthy_mirror(tmp_path, upstream):
    """dnsmirror whose HTTPS stand-in listener is up, forwarding to unbound."""
    with capturing_mirror(tmp_path, upstream, ECR, "10.96.0.53", "fd00::53") as (port, _, _):
        yield port


def test_captured_a_aaaa_and_https_types(healthy_mirror):
    port = healthy_mirror
    a = dig(port, ECR.upper() + ".")
    assert dig_status(a.stdout) == "NOERROR"
    assert "aa" not in dig_flags(a.stdout)
    assert dig_answers(a.stdout) == [(ECR.upper() + ".", 5, "A", "10.96.0.53")]

    aaaa = dig(port, ECR, "AAAA")
    assert dig_answers(aaaa.stdout) == [(ECR + ".", 5, "AAAA", "fd00::53")]

    for qtype in ("TYPE65", "TYPE64"):
        result = dig(port, ECR, qtype)
        assert dig_status(result.stdout) == "NOERROR", result.stdout
        assert dig_answers(result.stdout) == []

    over_tcp = dig(port, "europe-west1-docker.pkg.dev", "A", "+tcp")
    assert dig_answers(over_tcp.stdout) == [("europe-west1-docker.pkg.dev.", 5, "A", "10.96.0.53")]


def test_other_types_of_captured_names_are_forwarded(healthy_mirror):
    result = dig(healthy_mirror, ECR, "MX")
    assert dig_answers(result.stdout) == [(ECR + ".", 300, "MX", "10 mail.example.test.")]


def test_aaaa_is_empty_without_an_ipv6_mirror_address(tmp_path, upstream):
    https_port = free_port()
    overrides = {"dns": {"upstreams": [f"127.0.0.1:{upstream}"]},
                 "health": {"interval": "200ms", "timeout": "100ms", "failures": 1,
                            "targets": [f"127.0.0.1:{https_port}"]}}
    with tcp_listener(https_port), dnsmirror_serve(tmp_path, overrides) as (port, _, _):
        assert wait_until(lambda: dig_answers(dig(port, ECR).stdout)[0][3] == "127.0.0.1", 10)
        aaaa = dig(port, ECR, "AAAA")
        assert dig_status(aaaa.stdout) == "NOERROR"
        assert dig_answers(aaaa.stdout) == []


def test_forwarded_answers_pass_through(healthy_mirror):
    port = healthy_mirror
    assert dig_answers(dig(port, "www.example.test").stdout) == [
        ("www.example.test.", 300, "A", "192.0.2.10")
    ]

    nx = dig(port, "missing.example.test")
    assert dig_status(nx.stdout) == "NXDOMAIN"

    chain = dig_answers(dig(port, "alias2.example.test").stdout)
    assert ("alias2.example.test.", 300, "CNAME", "alias.example.test.") in chain
    assert ("alias.example.test.", 300, "CNAME", "www.example.test.") in chain

    over_tcp = dig(port, "www.example.test", "A", "+tcp")
    assert dig_answers(over_tcp.stdout) == [("www.example.test.", 300, "A", "192.0.2.10")]


def test_truncation_passes_to_udp_clients_and_tcp_gets_the_whole_answer(healthy_mirror):
    port = healthy_mirror
    truncated = dig(port, "big.example.test", "TXT", "+noedns", "+ignore")
    assert "tc" in dig_flags(truncated.stdout), truncated.stdout
    whole = dig(port, "big.example.test", "TXT", "+tcp")
    assert len(dig_answers(whole.stdout)) == len(BIG_TXT)
    with_edns = dig(port, "big.example.test", "TXT", "+bufsize=4096", "+ignore")
    assert "tc" not in dig_flags(with_edns.stdout)
    assert len(dig_answers(with_edns.stdout)) == len(BIG_TXT)


def test_second_upstream_answers_when_the_first_is_silent(tmp_path, upstream):
    with silent_udp_server() as silent, dnsmirror_serve(
        tmp_path, {"dns": {"upstreams": [f"127.0.0.1:{silent}", f"127.0.0.1:{upstream}"], "timeout": "500ms"}}
    ) as (port, _, _):
        started = time.monotonic()
        result = dig(port, "www.example.test")
        assert dig_answers(result.stdout) == [("www.example.test.", 300, "A", "192.0.2.10")], result.stdout
        assert time.monotonic() - started < 2.5


def test_servfail_within_the_timeout_budget_when_all_upstreams_are_silent(tmp_path):
    with (
        silent_udp_server() as one,
        silent_udp_server() as two,
        dnsmirror_serve(
            tmp_path,
            {"dns": {"upstreams": [f"127.0.0.1:{one}", f"127.0.0.1:{two}"], "timeout": "400ms"}},
            wait=False,
        ) as (port, _, _),
    ):
        assert wait_until(
            lambda: dig_status(dig(port, "x.example.test", timeout=1).stdout) != "NO ANSWER", 10
        )
        started = time.monotonic()
        result = dig(port, "www.example.test", timeout=5)
        elapsed = time.monotonic() - started
        assert dig_status(result.stdout) == "SERVFAIL", result.stdout
        assert 0.7 < elapsed < 2.0, elapsed


def test_clients_outside_the_allow_list_are_refused(tmp_path, upstream):
    overrides = {"dns": {"upstreams": [f"127.0.0.1:{upstream}"], "allow": ["127.0.0.2/32"]}}
    with dnsmirror_serve(tmp_path, overrides, wait=False) as (port, _, _):
        assert wait_until(
            lambda: dig_status(dig(port, "www.example.test", timeout=1).stdout) == "REFUSED", 10
        )
        refused = dig(port, ECR)
        assert dig_status(refused.stdout) == "REFUSED" and dig_answers(refused.stdout) == []
        allowed = dig(port, "www.example.test", "A", "-b", "127.0.0.2")
        assert dig_answers(allowed.stdout) == [("www.example.test.", 300, "A", "192.0.2.10")]


def test_fail_open_while_the_mirror_is_down_and_capture_again_once_back(tmp_path, upstream):
    https_port = free_port()
    overrides = {
        "dns": {"upstreams": [f"127.0.0.1:{upstream}"]},
        "mirror": {"address": "10.96.0.53"},
        "health": {
            "interval": "200ms",
            "timeout": "100ms",
            "failures": 2,
            "targets": [f"127.0.0.1:{https_port}"],
        },
    }

    def answer() -> str:
        answers = dig_answers(dig(port, ECR).stdout)
        return answers[0][3] if answers else ""

    with dnsmirror_serve(tmp_path, overrides) as (port, _, log):
        # no HTTPS listener yet: the real address from upstream
        assert answer() == "192.0.2.99"
        with tcp_listener(https_port):
            assert wait_until(lambda: answer() == "10.96.0.53", 5), log.read_text()
        assert wait_until(lambda: answer() == "192.0.2.99", 5), log.read_text()
        with tcp_listener(https_port):
            assert wait_until(lambda: answer() == "10.96.0.53", 5)
        text = log.read_text()
        assert text.count("unhealthy, failing open") >= 1 and text.count("healthy, capturing") >= 2


def test_serve_reports_a_port_it_cannot_bind(tmp_path):
    import subprocess
    import sys

    import yaml

    with tcp_listener(free_port()) as busy:
        port = busy.getsockname()[1]
        config = tmp_path / "busy.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "dns": {"listen": [f"127.0.0.1:{port}"]},
                    "https": {"listen": []},
                    "health": {"targets": ["127.0.0.1:9"]},
                    "metrics": {"listen": None},
                }
            )
        )
        result = subprocess.run([sys.executable, "-m", "dnsmirror", "serve", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2
    assert f"dns.listen[0]: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr


def test_metrics_count_outcomes_and_readiness_follows_health(tmp_path, upstream):
    import urllib.error
    import urllib.request

    https_port, metrics_port = free_port(), free_port()
    overrides = {
        "dns": {"upstreams": [f"127.0.0.1:{upstream}"], "allow": ["127.0.0.1/32"]},
        "health": {
            "interval": "200ms",
            "timeout": "100ms",
            "failures": 1,
            "targets": [f"127.0.0.1:{https_port}"],
        },
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(text: str, line_start: str) -> float:
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))

    with dnsmirror_serve(tmp_path, overrides) as (port, _, _):
        assert get("/healthz")[0] == 200
        status, body = get("/readyz")
        assert status == 503 and "not ready" in body
        assert dig_answers(dig(port, ECR).stdout)[0][3] == "192.0.2.99"  # fail open: the real address
        with tcp_listener(https_port):
            assert wait_until(lambda: get("/readyz")[0] == 200, 5)
            for _ in range(3):
                dig(port, ECR)
            dig(port, "www.example.test")
            dig(port, ECR, "A", "-b", "127.0.0.2")  # outside dns.allow
            # the DNS process reports its counters every STATS_INTERVAL
            assert wait_until(
                lambda: metric(get("/metrics")[1], 'dnsmirror_dns_queries_total{outcome="refused"}') == 1, 5
            )
            text = get("/metrics")[1]
    assert metric(text, 'dnsmirror_dns_queries_total{outcome="captured"}') == 3
    assert metric(text, 'dnsmirror_dns_queries_total{outcome="fail_open"}') >= 1
    assert metric(text, 'dnsmirror_dns_queries_total{outcome="refused"}') == 1
    assert metric(text, 'dnsmirror_dns_queries_total{outcome="forwarded"}') >= 2
    assert metric(text, "dnsmirror_mirror_healthy") == 1
    assert metric(text, "dnsmirror_health_changes_total") >= 1
