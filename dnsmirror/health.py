"""Health of the local mirror, which decides whether the DNS captures names or fails open.

:class:`HealthState` is the switch the DNS server follows; anything may flip it (a probe, or the
HTTPS service when it stops in-process). :class:`ListenerProbe` checks periodically that every HTTPS
listener accepts connections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

from dnsmirror.config import HostPort
from dnsmirror.logs import fields
from dnsmirror.periodic import Periodic

log = logging.getLogger("dnsmirror.health")


class HealthState:
    """Whether the mirror is healthy; starts unhealthy so that nothing is captured before it is proven."""

    def __init__(self) -> None:
        self.healthy = False
        self.reason = "not probed yet"
        self._listeners: list[Callable[[bool], None]] = []

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(healthy)`` now and on every change."""
        self._listeners.append(listener)
        listener(self.healthy)

    def set(self, healthy: bool, reason: str) -> None:
        """Record the current health; listeners hear only of changes."""
        if healthy == self.healthy:
            self.reason = reason
            return
        self.healthy = healthy
        self.reason = reason
        log.log(
            logging.INFO if healthy else logging.WARNING,
            "mirror is %s: %s",
            "healthy, capturing registry names" if healthy else "unhealthy, failing open",
            reason,
            extra=fields(event="health_change", healthy=healthy, reason=reason),
        )
        for listener in list(self._listeners):
            listener(healthy)


def _probe_target(listen: HostPort) -> HostPort:
    """Where to connect to check a listener: a wildcard bind is reached over loopback."""
    if listen.host == "0.0.0.0":
        return HostPort("127.0.0.1", listen.port)
    if listen.host == "::":
        return HostPort("::1", listen.port)
    return listen


class ListenerProbe:
    """Every ``interval``: connect to each HTTPS listener; healthy when all accept, unhealthy after
    ``failures`` consecutive failed rounds."""

    def __init__(self, reactor, state: HealthState, listeners: Sequence[HostPort], interval: float,
                 timeout: float, failures: int) -> None:
        self.reactor = reactor
        self.state = state
        self.targets = [_probe_target(hp) for hp in listeners]
        self.interval = interval
        self.timeout = timeout
        self.failures = failures
        self._failed_rounds = 0
        self._stopped = False
        self._loop = Periodic(reactor, interval, self.probe_once, "health probe", first=0)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        """No more rounds; a round still connecting no longer changes :attr:`state`."""
        self._stopped = True
        self._loop.stop()

    @defer.inlineCallbacks
    def probe_once(self):
        """One round over all listeners; updates :attr:`state`."""
        problems = []
        for target in self.targets:
            try:
                yield self._connect(target)
            except Exception as exc:  # noqa: BLE001 - any failure to connect is unhealthy
                problems.append(f"{target}: {exc.__class__.__name__}")
        if self._stopped:
            return  # stopped meanwhile (shutting down): this round must not switch capture back on
        if not problems:
            self._failed_rounds = 0
            self.state.set(True, "HTTPS listeners accept connections")
            return
        self._failed_rounds += 1
        if self._failed_rounds >= self.failures or not self.state.healthy:
            self.state.set(False, "HTTPS listener not reachable: " + ", ".join(problems))

    def _connect(self, target: HostPort) -> defer.Deferred:
        endpoint_type = TCP6ClientEndpoint if ":" in target.host else TCP4ClientEndpoint
        endpoint = endpoint_type(self.reactor, target.host, target.port, timeout=self.timeout)
        connecting = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        return connecting.addCallback(_hang_up)


def _hang_up(connected: Any) -> None:
    """Close a probe's connection as soon as it is made: reaching the listener is all it checks."""
    connected.transport.abortConnection()
