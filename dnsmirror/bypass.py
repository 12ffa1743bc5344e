"""Registries whose certificate the mirror cannot verify are left uncaptured for a while (fail open).

The mirror runs on the node's network and resolvers, so when a registry is unreachable from the mirror
it is unreachable for the node too, and staying captured keeps cached pulls working. TLS is the one
failure that can be the mirror's own: a registry whose CA the node's container runtime trusts but
``upstream.ca_bundle`` does not hold. Captured, every uncached pull from it would get a 502. After such
a failure its name resolves to its real address for ``upstream.tls_failure_bypass``; the runtime then
connects directly and verifies the certificate with its own trust, so nothing is trusted that was not
trusted before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dnsmirror import oci
from dnsmirror.logs import fields

log = logging.getLogger("dnsmirror.bypass")


class TlsBypass:
    """Which registries are not captured now, because the mirror could not verify their certificate.

    ``clock`` is a reactor (``seconds``, ``callLater``). ``on_start`` is called when a registry starts
    being bypassed (the DNS drops the captured answers it remembers). ``duration`` 0 turns this off.
    """

    def __init__(self, clock, duration: float, on_start: Callable[[], None] | None = None) -> None:
        self.clock = clock
        self.duration = duration
        self.on_start = on_start
        self.started = 0  # bypasses begun since start (a counter for metrics)
        self._until: dict[str, float] = {}

    def record_failure(self, host: str, reason: str) -> None:
        """Upstream TLS with ``host`` failed (``reason`` says how): stop capturing it for ``duration``."""
        if self.duration <= 0:
            return
        host = oci.upstream_host(host)
        now = self.clock.seconds()
        if self._until.get(host, 0.0) > now:
            return  # already bypassed: requests that were under way fail the same way
        self._until[host] = now + self.duration
        self.started += 1
        log.warning(
            "cannot verify %s's certificate; its name resolves to its real address for %gs, so clients "
            "connect directly (add its CA to upstream.ca_bundle to mirror it): %s", host, self.duration, reason,
            extra=fields(event="upstream_tls_bypass", host=host, seconds=self.duration, reason=reason),
        )
        self.clock.callLater(self.duration, self._expired, host)
        if self.on_start is not None:
            self.on_start()

    def _expired(self, host: str) -> None:
        until = self._until.get(host)
        if until is not None and until <= self.clock.seconds():
            del self._until[host]
            log.info("capturing %s again", host, extra=fields(event="upstream_tls_bypass_end", host=host))

    def bypassed(self, name: str) -> bool:
        """Whether the DNS name (or server name) ``name`` should now resolve to its real address."""
        if not self._until:
            return False
        until = self._until.get(oci.upstream_host(name))
        return until is not None and until > self.clock.seconds()

    def remaining(self) -> dict[str, float]:
        """Seconds left of each bypass in force (for the DNS process, which keeps its own clock)."""
        now = self.clock.seconds()
        return {host: until - now for host, until in self._until.items() if until > now}

    @property
    def active(self) -> int:
        """How many registries are bypassed now."""
        now = self.clock.seconds()
        return sum(1 for until in self._until.values() if until > now)
