"""Default upstream resolvers: the nameservers of /etc/resolv.conf, minus dnsmirror's own addresses."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

from dnsmirror.config import MAX_DNS_UPSTREAMS, HostPort


def nameservers(text: str) -> list[str]:
    """IP addresses of the ``nameserver`` lines of a resolv.conf text, in order."""
    servers = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            address = parts[1].split("%", 1)[0]
            try:
                servers.append(str(ipaddress.ip_address(address)))
            except ValueError:
                continue
    return servers


def default_upstreams(own: Iterable[HostPort], path: str | Path = "/etc/resolv.conf") -> list[HostPort]:
    """Upstreams from resolv.conf on port 53, skipping any address dnsmirror itself listens on, each once,
    at most ``MAX_DNS_UPSTREAMS`` (the rules ``dns.upstreams`` is checked against; resolv.conf is not
    config, so what breaks them is dropped rather than refused)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    own_hosts = {ipaddress.ip_address(hp.host) for hp in own if hp.port == 53}
    chosen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, HostPort] = {}
    for host in nameservers(text):
        address = ipaddress.ip_address(host)
        if address not in own_hosts and address not in chosen:
            chosen[address] = HostPort(host, 53)
    return list(chosen.values())[:MAX_DNS_UPSTREAMS]
