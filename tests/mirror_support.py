"""dnsmirror as a cluster node in a network namespace, with real upstream DNS and registries.

``upstream_dns`` runs unbound inside a namespace, authoritative for the registry names the test
gives it (they resolve to the test registries' namespace addresses). ``MirrorNode`` runs
``dnsmirror serve`` in a node namespace whose resolv.conf points at dnsmirror itself, with its own
cluster CA, exactly as on a real node.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dnslib import DNSRecord
from harness import ECR_HOST
from harness.dns import StaticDNS
from harness.netns import Cluster, Namespace, Process
from harness.pki import TestCA, bundle, create_ca
from harness.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def upstream_dns(
    namespace: Namespace, workdir: Path, names: Mapping[str, str | Iterable[str]]
) -> Iterator[str]:
    """The real DNS of the test world (:class:`harness.dns.StaticDNS`) answering ``names`` (host -> IPv4s)
    on ``namespace.address:53``; yields that address, as dnsmirror's upstream resolver."""
    with StaticDNS(namespace, names, workdir):
        yield namespace.address


@dataclass
class Upstream:
    """The upstream side of a test world: Debian's docker-registry serving :data:`harness.ECR_HOST` over TLS
    (a certificate from ``ca``, the web PKI stand-in), the DNS that names it (``dns``, an address for
    :class:`MirrorNode`), and ``pusher``, a namespace that reaches the registry without dnsmirror."""

    registry: Registry
    ca: TestCA
    dns: str
    pusher: Namespace


@contextlib.contextmanager
def registry_upstream(cluster: Cluster, workdir: Path, *, users: Mapping[str, str] | None = None,
                      names: Mapping[str, str | Iterable[str]] | None = None) -> Iterator[Upstream]:
    """:class:`Upstream` in new ``registry`` and ``pusher`` namespaces of ``cluster``; with ``users`` the
    registry requires a login (htpasswd); the DNS also answers ``names``. Stopped on exit."""
    registry_ns = cluster.add("registry")
    pusher = cluster.add("pusher", hosts={ECR_HOST: registry_ns.address})
    ca = create_ca(workdir / "public-ca")
    records = {ECR_HOST: registry_ns.address, **(names or {})}
    with Registry(registry_ns, ECR_HOST, ca, workdir / "registry", users=users) as registry, \
            upstream_dns(registry_ns, workdir / "dns", records) as dns:
        yield Upstream(registry, ca, dns, pusher)


def resolve(address: str, name: str, qtype: str = "A") -> list[str]:
    """``qtype`` (A or AAAA) records for ``name`` from the DNS server at ``address`` (IPv4 or IPv6; run
    inside a namespace with ``call``)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.sendto(DNSRecord.question(name, qtype).pack(), (address, 53))
        reply = DNSRecord.parse(sock.recvfrom(4096)[0])
    wanted = 28 if qtype == "AAAA" else 1
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == wanted]


def endpoint(address: str, port: int) -> str:
    """``address:port``, the IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def curl_argv(host: str, address: str, path: str, trust: str | os.PathLike[str], *options: str,
             max_time: float = 60) -> list[str]:
    """curl's argv for an HTTP/1.1 request for ``https://host{path}`` sent to ``address`` (dnsmirror's, or the
    registry's own for the request without dnsmirror), trusting only ``trust``; ``options`` come before
    the URL (``-o``, ``-w``, ``-H``, ``-u``, ...). Run it in a namespace with ``run`` or ``start``."""
    resolved = f"[{address}]" if ":" in address else address
    return ["curl", "-sS", "--http1.1", "--cacert", str(trust), "--resolve", f"{host}:443:{resolved}",
            "--max-time", f"{max_time:g}", *options, f"https://{host}{path}"]


def scrape_metrics(namespace: Namespace, address: str = "127.0.0.1", port: int = 9090) -> dict[str, float]:
    """dnsmirror's ``/metrics`` at ``address:port``, scraped from inside ``namespace``, as {sample with its
    labels: value}; empty when nothing answers."""
    done = namespace.run(["curl", "-sS", "--max-time", "10", f"http://{endpoint(address, port)}/metrics"],
                         check=False, timeout=30)
    samples = {}
    for line in done.stdout.decode(errors="replace").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@dataclass
class MirrorNode:
    """``dnsmirror serve`` in ``namespace`` on its own address (DNS :53, HTTPS :443).

    The address is ``namespace.address``: an IPv6 one (an IPv6-only node) becomes ``mirror.address6``
    with ``mirror.address: null``; a dual-stack node sets both with ``overrides``.
    """

    namespace: Namespace
    workdir: Path
    upstream_dns: str
    public_ca: TestCA
    overrides: dict[str, Any] | None = None
    cpus: str | None = None  # taskset CPU list to pin dnsmirror to (benchmarks)
    nofile: int | None = None  # RLIMIT_NOFILE (soft and hard) to start dnsmirror with, as `ulimit -n` would
    process: Process | None = None

    @property
    def address(self) -> str:
        return self.namespace.address

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    @property
    def config_path(self) -> Path:
        return self.workdir / "dnsmirror.yaml"

    def config(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "dns": {
                "listen": [endpoint(self.address, 53)],
                "upstreams": [endpoint(self.upstream_dns, 53)],
                "timeout": "1s",
            },
            "mirror": {"address": None, "address6": self.address}
            if ":" in self.address
            else {"address": self.address},
            "https": {"listen": [endpoint(self.address, 443)]},
            "health": {"interval": "500ms", "timeout": "400ms"},
            "tls": {"ca_cert": str(self.ca_dir / "ca.crt"), "ca_key": str(self.ca_dir / "ca.key")},
            "upstream": {
                "ca_bundle": str(self.public_ca.cert_path),
                "connect_timeout": "3s",
                "first_byte_timeout": "10s",
                "read_timeout": "10s",
            },
            "cache": {"dir": str(self.workdir / "cache")},
            "log": {"format": "json", "level": "info"},
        }
        for section, values in (self.overrides or {}).items():
            if isinstance(values, dict):
                document.setdefault(section, {}).update(values)
            else:
                document[section] = values
        return document

    def trust_bundle(self) -> Path:
        """What a node trusts: the public web PKI stand-in plus dnsmirror's root."""
        return bundle([self.public_ca.cert_path, self.ca_dir / "root.crt"], self.workdir / "node-trust.pem")

    def start(self) -> MirrorNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.ca_dir / "ca.crt").exists():
            subprocess.run([sys.executable, "-m", "dnsmirror", "ca", "init", "--dir", str(self.ca_dir)],
                           check=True, capture_output=True, timeout=60)
        self.config_path.write_text(yaml.safe_dump(self.config()))
        self.namespace.write_resolv_conf([self.address])
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        if self.nofile:
            pin = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *pin]
        self.process = self.namespace.start([*pin, sys.executable, "-m", "dnsmirror", "serve", "--config",
                                             str(self.config_path)], "dnsmirror")
        self.process.wait_until(self.captures, "capturing registry names", timeout=30)
        return self

    def captures(self, name: str = "123456789012.dkr.ecr.us-east-1.amazonaws.com") -> bool:
        qtype = "AAAA" if ":" in self.address else "A"
        try:
            return self.namespace.call(resolve, self.address, name, qtype) == [self.address]
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)

    def log(self) -> str:
        return self.process.describe(200) if self.process is not None else ""

    def log_records(self) -> list[dict[str, Any]]:
        """Every JSON log record dnsmirror wrote so far (``log.format: json``), oldest first."""
        if self.process is None:
            return []
        lines = self.process.whole_lines(stderr_too=True)
        return [json.loads(line[line.index("{"):]) for line in lines if "{" in line]

    def __enter__(self) -> MirrorNode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
