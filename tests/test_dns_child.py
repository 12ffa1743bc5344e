"""The line protocol between the mirror process and its DNS process, without starting either:
malformed or partial lines change nothing, counters are added to the parent's own, a silent child is
killed and replaced, and a word that is not an explicit "healthy" never turns capture on."""

from __future__ import annotations

import dataclasses
import json
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.python.failure import Failure

from dnsmirror.dns import child, priority
from dnsmirror.dns.child import (
    SILENT_CHILD_AFTER,
    ChildSettings,
    DnsProcess,
    DnsProcesses,
    _Lines,
    _Realtime,
    parse_health,
    parse_report,
    parse_upstream,
    upstream_line,
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
        self.argvs: list[list[str]] = []

    def spawnProcess(self, proto, executable, argv, **kwargs) -> None:
        proto.transport = FakeTransport()
        self.spawned.append(proto)
        self.argvs.append(argv)


def settings() -> ChildSettings:
    return ChildSettings(
        listen=[], upstreams=[], timeout=1.0, allow=[], ttl=5, answer_cache_size=8, address=None,
        address6=None, capture=[], skip=[], log_format="text", log_level="warning", stale_after=2.0,
    )


def report(capturing: bool = True, **counters: int) -> bytes:
    return json.dumps({"stats": counters, "upstreams_down": 0, "capturing": capturing}).encode() + b"\n"


class FakeNice:
    """Nice values of a fake mirror process and its fake children (by pid)."""

    def __init__(self, own: int = 0, children: dict[int, int] | None = None) -> None:
        self.mirror = own
        self.children = children if children is not None else {4242: -5}
        self.lowered: list[int] = []

    def of(self, pid: int) -> int | None:
        return self.children.get(pid)

    def own(self) -> int:
        return self.mirror

    def lower_own(self, steps: int) -> int:
        self.lowered.append(steps)
        self.mirror = min(self.mirror + steps, 19)
        return self.mirror


def started(nice: FakeNice | None = None, **changes) -> tuple[SpawningClock, DnsProcess, DnsStats]:
    clock = SpawningClock()
    stats = DnsStats()
    chosen = dataclasses.replace(settings(), **changes)
    process = DnsProcess(
        clock, chosen, [], stats, HealthState(), None, heartbeat=1.0, nice=nice or FakeNice()
    )
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


def test_the_real_time_flag_follows_the_childs_last_report_and_needs_an_explicit_true():
    _, process, _ = started()
    process.child.outReceived(b'{"stats": {}, "realtime": true}\n')
    assert process.realtime
    process.child.outReceived(b'{"stats": {}, "realtime": 1}\n')
    assert not process.realtime
    process.child.outReceived(b'{"stats": {}, "realtime": true}\n')
    process.child.processEnded(Failure(RuntimeError("killed")))
    assert not process.realtime  # nobody holds the priority while no process runs


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
    assert parse_report(b'{"stats": {}}') == ({name: 0 for name in child._CHILD_COUNTERS}, 0, False, False)


def test_a_child_that_raised_its_own_priority_leaves_the_mirror_process_as_it_is():
    nice = FakeNice(own=0, children={4242: -5})
    _, process, _ = started(nice)
    assert process.priority_gap is None  # not settled before the child's start-up is done
    process.child.outReceived(report())
    assert nice.lowered == [] and process.priority_gap == 5


def test_a_child_refused_a_higher_priority_makes_the_mirror_process_lower_its_own():
    nice = FakeNice(own=2, children={4242: 2})  # e.g. a container without CAP_SYS_NICE, started at nice 2
    _, process, _ = started(nice, cpu_priority=7)
    process.child.outReceived(report())
    process.child.outReceived(report())
    assert nice.lowered == [7] and nice.mirror == 9 and process.priority_gap == 7


def test_a_replaced_child_is_settled_again_and_the_lowest_priority_bounds_the_gap():
    nice = FakeNice(own=17, children={4242: 17})
    clock, process, _ = started(nice)
    process.child.outReceived(report())
    assert nice.lowered == [2] and process.priority_gap == 2  # nice 19 is as low as it goes
    process.child.processEnded(Failure(RuntimeError("killed")))
    clock.advance(child.RESTART_DELAY)
    process.child.outReceived(report())
    assert nice.lowered == [2] and process.priority_gap == 2  # nothing more to give


def test_cpu_priority_zero_changes_no_priority():
    nice = FakeNice(own=0, children={4242: 0})
    _, process, _ = started(nice, cpu_priority=0)
    process.child.outReceived(report())
    assert nice.lowered == [] and process.priority_gap == 0


def test_the_decision_of_how_far_the_mirror_process_yields():
    assert priority.yield_steps(0, -5, 5) == 0
    assert priority.yield_steps(0, 0, 5) == 5
    assert priority.yield_steps(0, -2, 5) == 3
    assert priority.yield_steps(3, 0, 5) == 2
    assert priority.yield_steps(10, 0, 5) == 0  # already further apart than asked
    assert priority.yield_steps(18, 18, 5) == 1  # 19 is the lowest priority there is
    assert priority.yield_steps(19, 19, 5) == 0


def test_the_real_time_share_leaves_most_of_a_small_machine_to_the_rest():
    assert priority.realtime_share(1) == 0.4
    assert priority.realtime_share(2) == 0.8
    assert priority.realtime_share(64) == 0.8  # one thread never takes more than a core


def test_the_real_time_budget_lets_a_resolver_keep_its_priority():
    budget = priority.RealtimeBudget(share=0.5, cool_down=5.0)
    assert budget.allowed(0.0, 10.0)  # no interval measured yet
    assert budget.allowed(0.5, 10.2)  # 40% of a core
    assert budget.allowed(1.0, 10.45)  # 50%: at the share, not over it


def test_a_process_over_its_cpu_share_is_an_ordinary_task_until_its_cool_down_ends():
    budget = priority.RealtimeBudget(share=0.5, cool_down=5.0)
    budget.allowed(0.0, 0.0)
    assert not budget.allowed(0.5, 0.3)  # 60% of a core: a flood
    assert not budget.allowed(1.0, 0.3)  # idle again, but cooling down
    assert not budget.allowed(5.4, 0.3)
    assert budget.allowed(5.5, 0.3)
    assert not budget.allowed(6.0, 0.8)  # over again: another cool-down from now
    assert budget.allowed(11.0, 0.8)


def test_an_overrun_the_kernel_reports_starts_a_cool_down():
    budget = priority.RealtimeBudget(share=0.5, cool_down=5.0)
    budget.allowed(0.0, 0.0)
    budget.overran(1.0)
    assert not budget.allowed(1.5, 0.0)
    assert budget.allowed(6.0, 0.0)


def test_the_dns_processes_are_spread_over_the_cores_one_per_core():
    assert priority.answering_cores({0, 1}, 2) == [0, 1]
    assert priority.answering_cores(range(8), 2) == [0, 4]
    assert priority.answering_cores({3, 5}, 4) == [3, 5]  # no more processes than cores
    assert priority.answering_cores({0, 1}, 1) == [None]  # one process: on whichever core is free
    assert priority.answering_cores({2}, 2) == [None]  # one core: one process, as before


@given(st.sets(st.integers(0, 255), min_size=1, max_size=64), st.integers(1, 64))
def test_every_dns_process_has_a_core_of_its_own_among_the_allowed(allowed, processes):
    cores = priority.answering_cores(allowed, processes)
    if min(processes, len(allowed)) < 2:
        assert cores == [None]
    else:
        assert len(cores) == min(processes, len(allowed)) == len(set(cores))
        assert set(cores) <= allowed


def test_the_real_time_budget_is_shared_among_the_dns_processes():
    whole = priority.realtime_share(len(os.sched_getaffinity(0)))
    assert _Realtime(task.Clock()).budget.share == whole
    assert _Realtime(task.Clock(), 2).budget.share == whole / 2


def two_processes(nice: FakeNice | None = None) -> tuple[SpawningClock, DnsProcesses, DnsStats]:
    clock, stats, health = SpawningClock(), DnsStats(), HealthState()
    members = [
        DnsProcess(clock, dataclasses.replace(settings(), processes=2, core=core), [], stats, health, None,
                   heartbeat=1.0, nice=nice or FakeNice())
        for core in (0, 1)
    ]
    processes = DnsProcesses(members)
    processes.start()
    return clock, processes, stats


def test_each_dns_process_is_started_with_its_own_core_and_told_the_health():
    clock, processes, _ = two_processes()
    started_with = [ChildSettings.from_json(argv[-1]) for argv in clock.argvs]
    assert [(chosen.core, chosen.processes) for chosen in started_with] == [(0, 2), (1, 2)]
    sent = [len(spawned.transport.written) for spawned in clock.spawned]
    processes.tell()
    assert [len(spawned.transport.written) for spawned in clock.spawned] == [n + 1 for n in sent]


def test_the_counters_of_every_dns_process_add_up():
    _, processes, stats = two_processes()
    first, second = (member.child for member in processes.members)
    first.outReceived(report(captured=5))
    second.outReceived(report(captured=3, forwarded=1))
    first.outReceived(report(captured=6))
    assert (stats.captured, stats.forwarded) == (9, 1)


def test_ready_while_every_dns_process_runs_and_captures():
    clock, processes, _ = two_processes()
    first, second = (member.child for member in processes.members)
    processes.members[0].health.set(True, "ok")
    first.outReceived(report(capturing=True))
    assert not processes.readiness.healthy and processes.running == 1
    assert processes.readiness.reason == "the DNS process is not running"
    second.outReceived(report(capturing=True))
    assert processes.readiness.healthy and processes.running == 2
    second.processEnded(Failure(RuntimeError("killed")))
    assert not processes.readiness.healthy and processes.running == 1
    clock.advance(child.RESTART_DELAY)
    processes.members[1].child.outReceived(report(capturing=True))
    assert processes.readiness.healthy


def test_the_dns_processes_report_as_one():
    nice = FakeNice(own=0, children={4242: -5})
    _, processes, _ = two_processes(nice)
    first, second = (member.child for member in processes.members)
    assert processes.priority_gap is None and not processes.realtime
    first.outReceived(b'{"stats": {}, "realtime": true, "upstreams_down": 2}\n')
    assert processes.priority_gap == 5 and not processes.realtime  # one of two is real-time
    second.outReceived(b'{"stats": {}, "realtime": true, "upstreams_down": 1}\n')
    assert processes.realtime and processes.upstreams_down == 2


def test_what_one_dns_process_finds_out_about_an_upstream_is_passed_to_the_others_only():
    _, processes, stats = two_processes()
    first, second = (member.child for member in processes.members)
    sent = [len(spawned.transport.written) for spawned in (first, second)]
    first.outReceived(upstream_line(1, False, "no answer in 2s"))
    assert len(first.transport.written) == sent[0]  # not told back
    assert second.transport.written[-1] == upstream_line(1, False, "no answer in 2s")
    assert stats.as_dict() == DnsStats().as_dict()  # not a report


def test_only_a_well_formed_upstream_message_is_one():
    assert parse_upstream(upstream_line(2, True, "")) == (2, True, "")
    assert parse_upstream(upstream_line(0, False, "x" * 1000)) == (0, False, "x" * child._MAX_REASON)
    malformed = [
        b"", b"null", b'{"upstream": 1}', b'{"upstream": [1, true]}', b'{"upstream": [-1, true, ""]}',
        b'{"upstream": [true, true, ""]}', b'{"upstream": [1, 1, ""]}', b'{"upstream": [1, true, 5]}',
    ]
    for line in [*malformed, b'{"healthy": true}']:
        assert parse_upstream(line) is None, line


def ticks_after(load: priority.MachineLoad, *idle_cores: float, cores: int = 2) -> bool:
    """The load's answer after readings 100 ticks per core apart, in each of which ``idle_cores`` cores were
    idle on average."""
    idle, total = 1000, 5000
    load.update((idle, total, cores))
    for cores_idle in idle_cores:
        idle, total = idle + round(100 * cores_idle), total + 100 * cores
        busy = load.update((idle, total, cores))
    return busy


def test_real_time_priority_is_wanted_while_the_machine_is_busy_and_not_while_cores_are_idle():
    low, high = priority.REALTIME_IDLE_CORES
    checks = priority.REALTIME_IDLE_CHECKS
    assert ticks_after(priority.MachineLoad(busy=False), low - 0.1)  # busy: at once
    assert not ticks_after(priority.MachineLoad(busy=True), *[high + 0.1] * checks)  # idle: checks in a row
    # a busy machine's idle moment (a stream between two blobs) keeps it, however idle
    moment = [2.0] * (checks - 1)
    assert ticks_after(priority.MachineLoad(busy=True), *moment)
    assert ticks_after(priority.MachineLoad(busy=True), *moment, low - 0.1, *moment)
    assert ticks_after(priority.MachineLoad(busy=True), *moment, (low + high) / 2, *moment)
    # in between, as it was: a machine near the edge does not switch at every check
    assert ticks_after(priority.MachineLoad(busy=True), *[(low + high) / 2] * 10)
    assert not ticks_after(priority.MachineLoad(busy=False), (low + high) / 2)
    # counted in cores, not shares: half of 16 cores idle is an idle machine, 0.2 of 2 a busy one
    assert not ticks_after(priority.MachineLoad(), *[8] * checks, cores=16)
    assert ticks_after(priority.MachineLoad(busy=False), 0.2, cores=2)


def test_the_machine_load_keeps_its_answer_without_two_readings_to_compare():
    load = priority.MachineLoad(busy=False)
    assert not load.update(None)  # unreadable
    assert not load.update((10, 100, 2))  # the first reading: nothing to compare to
    assert not load.update((10, 100, 2))  # no time passed
    assert not load.update((5, 200, 2))  # counters went back (not this machine's?): no answer from them
    assert load.update((5, 300, 2))  # 100 ticks, none idle
    assert load.update((200, 400, 2))  # all idle: one reading is not enough


@given(st.lists(st.tuples(st.integers(-50, 400), st.integers(-50, 400)), min_size=1, max_size=30),
       st.integers(1, 8), st.booleans())
def test_the_machine_load_switches_only_as_its_idle_cores_say(steps, cores, busy):
    """Any counters, going back included: busy at once after an interval with few idle cores, idle only after
    ``idle_checks`` intervals in a row with many, and no change on a reading that measured no interval."""
    low, high = priority.REALTIME_IDLE_CORES
    load = priority.MachineLoad(busy=busy)
    idle, total = 10_000, 10_000
    answer = load.update((idle, total, cores))
    assert answer is busy  # the first reading has nothing to compare to
    run: list[float] = []  # idle cores of the intervals measured since the last one that was not idle
    for idle_step, total_step in steps:
        idle, total = idle + idle_step, total + total_step
        before, answer = answer, load.update((idle, total, cores))
        if total_step <= 0 or idle_step < 0:  # no interval measured
            assert answer is before
            continue
        idle_cores = cores * idle_step / total_step
        run = run + [idle_cores] if idle_cores > high else []
        if idle_cores < low:
            assert answer
        elif len(run) >= priority.REALTIME_IDLE_CHECKS:
            assert not answer
        else:
            assert answer is before


def test_machine_ticks_reads_the_whole_machine_and_counts_its_cores(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 1 5 100 7 0 2 3 0 0\ncpu0 5 0 2 50 3 0 1 1 0 0\ncpu1 5 1 3 50 4 0 1 2 0 0\n"
                    "intr 1 2 3\n")
    assert priority.machine_ticks(str(stat)) == (107, 128, 2)  # idle + iowait; steal counts as busy
    assert priority.machine_ticks(str(tmp_path / "missing")) is None
    stat.write_text("garbage\n")
    assert priority.machine_ticks(str(stat)) is None
    idle, total, cores = priority.machine_ticks()  # this machine's
    assert 0 <= idle <= total and cores >= 1
