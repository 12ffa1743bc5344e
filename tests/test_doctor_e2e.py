"""``dnsmirror doctor`` on a node namespace: all checks pass on a good node, and each broken set-up
(resolver not pointed, root not trusted, upstream unreachable, mirror down) fails its check with a fix."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from pathlib import Path

import pytest
from dns_support import silent_udp_server, unbound
from dnslib import AAAA, QTYPE, RR, DNSRecord
from harness import ECR_HOST, require_netns
from harness.images import build_image, push_image
from harness.netns import Cluster, clean_env
from harness.pki import bundle, create_ca
from harness.registry import Registry
from mirror_support import MirrorNode, upstream_dns

from dnsmirror import config as configmod
from dnsmirror.config import HostPort
from dnsmirror.doctor import Doctor, example_name, parse_reference, resolve_peers
from dnsmirror.patterns import HostMatcher

pytestmark = pytest.mark.integration

IMAGE = f"{ECR_HOST}/team/app:v1"


def test_references_and_names():
    assert parse_reference("ghcr.io/org/app:1.0") == ("ghcr.io", "org/app", "1.0")
    assert parse_reference("ghcr.io/org/app@sha256:ab") == ("ghcr.io", "org/app", "sha256:ab")
    assert parse_reference("nginx") == ("registry-1.docker.io", "library/nginx", "latest")
    assert parse_reference("localhost:5000/app") == ("localhost:5000", "app", "latest")
    assert example_name(("*.gcr.io", "quay.io"), HostMatcher(("*.gcr.io", "quay.io"), ())) == "quay.io"


def doctor(
    node, mirror: MirrorNode, trust: Path, image: str | None = IMAGE
) -> tuple[int, dict[str, str], str]:
    """Run doctor in ``node``; (exit status, {check: its line and fix}, whole output)."""
    done = node.run(
        [
            sys.executable,
            "-m",
            "dnsmirror",
            "doctor",
            "--config",
            str(mirror.config_path),
            *([image] if image else []),
        ],
        env=clean_env(ssl_cert_file=trust),
        check=False,
        timeout=90,
    )
    output = done.stdout.decode()
    checks: dict[str, str] = {}
    current = None
    for line in output.splitlines()[1:]:
        words = line.split()
        if len(words) >= 2 and words[0] in ("ok", "warn", "FAIL", "skip"):
            current = words[1]
            checks[current] = line
        elif current and line.strip().startswith("fix:"):
            checks[current] += "\n" + line.strip()
    assert "Traceback" not in done.stderr.decode(), done.stderr.decode()
    return done.returncode, checks, output


def test_peers_are_found_through_the_first_resolver_that_answers(tmp_path: Path) -> None:
    with silent_udp_server() as silent, unbound(tmp_path, ["peers.example.com. 60 IN A 10.9.0.1",
                                                          "peers.example.com. 60 IN A 10.9.0.2"]) as port:
        silent_first = (HostPort("127.0.0.1", silent), HostPort("127.0.0.1", port))
        found, _ = resolve_peers("peers.example.com", silent_first, timeout=0.5)
        assert found == ["10.9.0.1", "10.9.0.2"]
        found, problem = resolve_peers("peers.example.com", (HostPort("127.0.0.1", silent),), timeout=0.5)
        assert found is None and f"127.0.0.1:{silent}" in problem and "no answer" in problem


def test_doctor_finds_what_is_broken(tmp_path: Path) -> None:
    require_netns()
    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        pusher = cluster.add("pusher", hosts={ECR_HOST: registry_ns.address})
        node = cluster.add("node")
        ca = create_ca(tmp_path / "public-ca")
        image = build_image(tmp_path / "layout", tag="v1", platforms=("linux/amd64",))
        with Registry(registry_ns, ECR_HOST, ca, tmp_path / "registry") as registry, \
                upstream_dns(registry_ns, tmp_path / "dns", {ECR_HOST: registry_ns.address}) as dns:
            push_image(image, pusher, IMAGE, ca_file=ca.cert_path)
            with MirrorNode(node, tmp_path / "mirror", dns, ca) as mirror:
                trust = mirror.trust_bundle()
                # a good node: every check passes
                status, checks, output = doctor(node, mirror, trust)
                assert status == 0, output
                for check in ("ca", "resolver", "mirror", "upstream", "trust", "cache", "image"):
                    assert checks[check].startswith("ok"), output
                assert checks["containerd"].startswith("skip")
                assert image.index.digest in checks["image"]

                # the root is not in the node's trust store
                untrusted = bundle([ca.cert_path], tmp_path / "public-only.pem")
                status, checks, output = doctor(node, mirror, untrusted, image=None)
                assert status == 1 and checks["trust"].startswith("FAIL"), output
                assert "install the cluster root" in checks["trust"]
                assert checks["mirror"].startswith("ok") and checks["resolver"].startswith("ok"), output

                # the node resolver does not point at dnsmirror
                node.write_resolv_conf([dns])
                status, checks, output = doctor(node, mirror, trust, image=None)
                node.write_resolv_conf([mirror.address])
                assert status == 1 and checks["resolver"].startswith("FAIL"), output
                assert (
                    "it is not dnsmirror" in checks["resolver"] and "first nameserver" in checks["resolver"]
                )

                # upstream unreachable from the mirror
                registry.stop()
                status, checks, output = doctor(node, mirror, trust)
                assert status == 1 and checks["upstream"].startswith("FAIL"), output
                assert f"cannot reach {ECR_HOST}" in checks["upstream"] and "fix:" in checks["upstream"]
                assert checks["mirror"].startswith("ok"), output
                # the image's tag is still answered from the last digest upstream gave (cache.stale_tags)
                assert checks["image"].startswith("ok"), output

                # the mirror is down
                mirror.stop()
                status, checks, output = doctor(node, mirror, trust, image=None)
                assert status == 1 and checks["mirror"].startswith("FAIL"), output
                assert (
                    "connection refused" in checks["mirror"]
                    and "kubectl -n dnsmirror get pods" in checks["mirror"]
                )
                assert checks["resolver"].startswith("FAIL") and checks["upstream"].startswith("skip"), output


def test_doctor_on_an_ipv6_only_node_checks_aaaa_and_mirror_address6(tmp_path: Path) -> None:
    """With ``mirror.address`` null, the resolver check asks AAAA and the mirror checks connect to
    ``mirror.address6`` (a real UDP responder on ::1; nothing listens on the HTTPS port)."""
    responder = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    responder.bind(("::1", 0))
    responder.settimeout(10)
    asked: list[str] = []

    def answer_one() -> None:
        with contextlib.suppress(OSError):
            data, client = responder.recvfrom(4096)
            query = DNSRecord.parse(data)
            asked.append(QTYPE[query.q.qtype])
            reply = query.reply()
            reply.add_answer(RR(query.q.qname, QTYPE.AAAA, rdata=AAAA("0:0::1"), ttl=30))
            responder.sendto(reply.pack(), client)

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as unused:
        unused.bind(("::1", 0))
        closed_port = unused.getsockname()[1]  # bound, never listening: connections are refused
        config = configmod.parse_document({
            "mirror": {"address": None, "address6": "::1"},
            "https": {"listen": [f"[::1]:{closed_port}"]},
            "cache": {"dir": str(tmp_path / "cache")},
        })
        resolv_conf = tmp_path / "resolv.conf"
        resolv_conf.write_text("nameserver ::1\n")
        checks = Doctor(config, resolv_conf=resolv_conf, dns_port=responder.getsockname()[1])
        thread = threading.Thread(target=answer_one, daemon=True)
        thread.start()
        resolver = checks.check_resolver()
        thread.join(timeout=15)
        mirror = checks.check_mirror()
    responder.close()
    assert asked == ["AAAA"]
    assert resolver.status == "ok" and "with the mirror ::1" in resolver.detail, resolver
    assert mirror.status == "FAIL" and f"[::1]:{closed_port}" in mirror.detail, mirror
    assert "connection refused" in mirror.detail
