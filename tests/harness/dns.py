"""The "real" DNS of the test world: unbound answering fixed A records, inside a namespace.

dnsmirror forwards names it does not capture, and resolves upstream registries, with its configured
upstream resolvers; in the end-to-end tests that upstream is this server, which knows e.g.
``123456789012.dkr.ecr.us-east-1.amazonaws.com -> <registry namespace address>``. It answers only its
records (NXDOMAIN / no data for anything else) and never queries anyone (``local-zone: "." static``
and no address allowed to be queried).

    with StaticDNS(registry_ns, {ECR_HOST: registry_ns.address}, tmp / "dns") as dns:
        mirror_config["dns"]["upstreams"] = [f"{dns.address}:53"]
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from .netns import Namespace, Process

# unbound's log-queries line: "[time] unbound[pid:0] info: CLIENT NAME. TYPE CLASS"
_QUERY_LINE = re.compile(r" info: \S+ (?P<name>\S+)\. (?P<type>\S+) IN$")


class StaticDNS:
    """unbound on ``namespace.address:port`` and any ``extra_addresses`` (UDP and TCP) serving ``records``
    (name -> IPv4 and IPv6 addresses, as A and AAAA records)."""

    def __init__(self, namespace: Namespace, records: Mapping[str, str | Iterable[str]],
                 workdir: str | os.PathLike[str], *, port: int = 53, address: str | None = None,
                 ttl: int = 30, extra_addresses: Iterable[str] = ()) -> None:
        self.namespace = namespace
        self.records = {
            name: [value] if isinstance(value, str) else list(value) for name, value in records.items()
        }
        self.workdir = Path(workdir)
        self.port = port
        self.address = address or namespace.address
        self.ttl = ttl
        self.extra_addresses = list(extra_addresses)  # more addresses to listen on, e.g. an IPv6 one
        self.process: Process | None = None

    @property
    def server(self) -> str:
        """``address:port``, as dnsmirror's ``dns.upstreams`` takes it."""
        return f"{self.address}:{self.port}"

    def config(self) -> str:
        """unbound.conf: local data only, no recursion, no outgoing queries."""
        lines = [
            "server:",
            *(f"  interface: {address}@{self.port}" for address in (self.address, *self.extra_addresses)),
            f"  port: {self.port}",
            "  do-daemonize: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{self.workdir}"',
            f'  pidfile: "{self.workdir}/unbound.pid"',
            "  use-syslog: no",
            '  logfile: ""',
            "  verbosity: 1",
            "  log-queries: yes",
            "  access-control: 0.0.0.0/0 allow",
            "  access-control: ::/0 allow",
            f"  do-ip6: {'yes' if any(':' in a for a in (self.address, *self.extra_addresses)) else 'no'}",
            "  num-threads: 1",
            "  do-not-query-address: 0.0.0.0/0",
            "  do-not-query-address: ::0/0",
            '  local-zone: "." static',
        ]
        for name, addresses in self.records.items():
            lines += [f'  local-data: "{name}. {self.ttl} IN {"AAAA" if ":" in address else "A"} {address}"'
                      for address in addresses]
        lines += ["remote-control:", "  control-enable: no"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15) -> StaticDNS:
        """Write the config, start unbound in the namespace and wait until it listens."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "unbound.conf"
        config_path.write_text(self.config())
        binary = shutil.which("unbound") or "/usr/sbin/unbound"
        self.process = self.namespace.start([binary, "-d", "-c", str(config_path)], "unbound")
        self.process.wait_listening(self.port, timeout)
        return self

    def stop(self) -> None:
        """Stop unbound."""
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> StaticDNS:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def queries(self) -> list[tuple[str, str]]:
        """``(name, type)`` of each query so far (from unbound's query log), oldest first."""
        if self.process is None:
            return []
        output = self.process.stdout() + self.process.stderr()
        return [(match["name"], match["type"]) for line in output.splitlines()
                if (match := _QUERY_LINE.search(line))]
