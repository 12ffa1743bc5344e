"""The line protocol between the mirror process and its DNS process, without starting either:
malformed or partial lines change nothing, counters are added to the parent's own, a silent child is
killed and replaced, and a word that is not an explicit "healthy" never turns capture on."""

from __future__ import annotations

import json

from twisted.internet import task
from twisted.python.failure import Failure

from dnsmirror.dns import child
from dnsmirror.dns.child import (
    SILENT_CHILD_AFTER,
    ChildSettings,
    DnsProcess,
    _Lines,
    parse_health,
    parse_report,
)
from dnsmirror.dns.stats import DnsStats
from dnsmirror.health import HealthState


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.signals: list[str] = []
        self.pid = 4242

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class SpawningClock(task.Clock):
    """A clock that also "spawns" processes: each gets a fake transport."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list = []

    def spawnProcess(self, proto, *args, **kwargs) -> None:
        proto.transport = FakeTransport()
        self.spawned.append(proto)


def settings() -> ChildSettings:
    return ChildSettings(
        listen=[], upstreams=[], timeout=1.0, allow=[], ttl=5, answer_cache_size=8, address=None,
        address6=None, capture=[], skip=[], log_format="text", log_level="warning", stale_after=2.0,
    )


def report(capturing: bool = True, **counters: int) -> bytes:
    return json.dumps({"stats": counters, "upstreams_down": 0, "capturing": capturing}).encode() + b"\n"


def started() -> tuple[SpawningClock, DnsProcess, DnsStats]:
    clock = SpawningClock()
    stats = DnsStats()
    process = DnsProcess(clock, settings(), [], stats, HealthState(), None, heartbeat=1.0)
    process.start()
    return clock, process, stats


def test_counters_are_added_to_the_parents_and_survive_a_restart():
    clock, process, stats = started()
    stats.health_changes = 3
    stats.captured = 7  # counted before: the child's counts add to it
    process.child.outReceived(report(captured=5, forwarded=2))
    process.child.outReceived(report(captured=9, forwarded=2))
    assert (stats.captured, stats.forwarded, stats.health_changes) == (16, 2, 3)
    process.child.processEnded(Failure(RuntimeError("killed")))
    clock.advance(child.RESTART_DELAY)
    assert len(clock.spawned) == 2
    process.child.outReceived(report(captured=1))
    assert (stats.captured, stats.forwarded, stats.health_changes) == (17, 2, 3)


def test_malformed_partial_and_backward_reports_change_nothing():
    _, process, stats = started()
    process.child.outReceived(report(captured=4))
    before = stats.as_dict()
    for line in [
        b"not json\n",
        b"[1, 2]\n",
        b'{"stats": {"captured": "5"}}\n',
        b'{"stats": {"captured": 5, "forwarded": -1}}\n',
        b'{"stats": {"captured": true}}\n',
        report(captured=3),  # counters never go back within one child
    ]:
        process.child.outReceived(line)
    assert stats.as_dict() == before
    process.child.outReceived(report(captured=6)[:10])  # half a line: nothing until its end arrives
    assert stats.captured == 4
    process.child.outReceived(report(captured=6)[10:])
    assert stats.captured == 6


def test_capturing_needs_an_explicit_true():
    _, process, _ = started()
    process.child.outReceived(b'{"stats": {}, "capturing": "false"}\n')
    assert process.readiness.running and not process.readiness.capturing
    process.child.outReceived(report(capturing=True))
    assert process.readiness.capturing


def test_a_silent_child_is_killed_and_replaced():
    clock, process, _ = started()
    first = process.child
    for _ in range(int(SILENT_CHILD_AFTER)):
        clock.advance(1.0)
        first.outReceived(report())
    assert first.transport.signals == []  # reporting: left alone
    process.health.set(True, "ok")
    first.outReceived(report(capturing=True))
    assert process.readiness.healthy
    for _ in range(int(SILENT_CHILD_AFTER) + 2):
        clock.advance(1.0)
    assert first.transport.signals == ["KILL"]
    assert not process.readiness.healthy
    first.processEnded(Failure(RuntimeError("killed")))
    clock.advance(child.RESTART_DELAY)
    assert process.child is not first and len(clock.spawned) == 2


def test_a_stuck_parent_does_not_kill_a_child_that_reported():
    clock, process, _ = started()
    clock.advance(1.0)
    process.child.outReceived(report())
    clock.advance(SILENT_CHILD_AFTER * 2)  # the parent's own reactor did nothing meanwhile
    assert process.child.transport.signals == []


def test_an_overlong_line_is_dropped_up_to_its_end():
    lines: list[bytes] = []
    reader = _Lines(lines.append)
    reader.feed(b"x" * (child._MAX_LINE + 1))
    reader.feed(b'y"}\n{"ok": 1}\n')
    assert lines == [b'{"ok": 1}']


def test_only_an_explicit_healthy_word_is_a_word():
    assert parse_health(b'{"healthy": true, "reason": "", "bypass": {"a.example": 3}}') == (
        True,
        {"a.example": 3.0},
    )
    assert parse_health(b'{"healthy": false}') == (False, {})
    for line in [b"", b"null", b'{"healthy": "true"}', b'{"healthy": 1}', b'{"reason": "x"}',
                 b'{"healthy": true, "bypass": {"a": "soon"}}', b'{"healthy": true, "bypass": [1]}']:
        assert parse_health(line) is None, line
    assert parse_report(b'{"stats": {}}') == ({name: 0 for name in child._CHILD_COUNTERS}, 0, False)
