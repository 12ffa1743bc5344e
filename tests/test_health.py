"""The health probe that decides capture vs fail open, with connections the test completes by hand."""

from __future__ import annotations

from twisted.internet import defer, task

from dnsmirror.config import HostPort
from dnsmirror.health import HealthState, ListenerProbe


class HandProbe(ListenerProbe):
    """A probe whose connection attempts stay pending until the test fires them."""

    def __init__(self, clock: task.Clock, state: HealthState, failures: int = 2) -> None:
        super().__init__(
            clock, state, [HostPort("127.0.0.1", 8443)], interval=2.0, timeout=1.0, failures=failures
        )
        self.pending: list[defer.Deferred] = []

    def _connect(self, target: HostPort) -> defer.Deferred:
        attempt: defer.Deferred = defer.Deferred()
        self.pending.append(attempt)
        return attempt


def test_capture_starts_after_a_good_round_and_stops_after_enough_bad_ones():
    clock, state = task.Clock(), HealthState()
    probe = HandProbe(clock, state, failures=2)
    probe.start()
    assert not state.healthy  # nothing is captured before it is proven
    probe.pending[-1].callback(None)
    assert state.healthy
    clock.advance(2)
    probe.pending[-1].errback(ConnectionRefusedError())
    assert state.healthy  # one bad round is not enough
    clock.advance(2)
    probe.pending[-1].errback(ConnectionRefusedError())
    assert not state.healthy and "not reachable" in state.reason
    probe.stop()


def test_a_round_still_connecting_when_the_probe_stops_does_not_switch_capture_back_on():
    clock, state = task.Clock(), HealthState()
    probe = HandProbe(clock, state)
    probe.start()
    probe.pending[-1].callback(None)
    clock.advance(2)  # the next round is connecting...
    probe.stop()  # ...when shutdown begins
    state.set(False, "shutting down")
    probe.pending[-1].callback(None)
    assert not state.healthy and state.reason == "shutting down"
    clock.advance(10)
    assert len(probe.pending) == 2  # and no round starts after the stop
