"""Per-outcome counters of the DNS server, read by the metrics endpoint."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class DnsStats:
    """Counts of what happened to each query (one outcome each), plus health transitions."""

    captured: int = 0       # answered with the mirror address (or an empty answer for AAAA/HTTPS/SVCB)
    forwarded: int = 0      # sent upstream and the answer passed back
    fail_open: int = 0      # captured name forwarded: the mirror was not healthy, or the registry is bypassed
    refused: int = 0        # client outside dns.allow
    malformed: int = 0      # unparseable packet, dropped
    servfail: int = 0       # every upstream failed, or too many forwards in flight
    overloaded: int = 0     # of those: not sent upstream, too many forwards in flight
    tcp_refused: int = 0    # TCP connections closed at once: too many in total or from one address
    tcp_timeouts: int = 0   # TCP connections closed because a query did not arrive whole in time
    rejected: int = 0       # FORMERR / NOTIMP answered locally
    unsent: int = 0         # of the UDP answers above: refused by the kernel (a full send buffer, no route)
    health_changes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
