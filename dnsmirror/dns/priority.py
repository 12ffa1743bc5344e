"""CPU priority of the DNS process against the mirror's blob work.

When the cores are busy streaming blobs, a DNS answer must not wait for the mirror's byte path. Linux
shares a core by nice value among the processes of one scheduling group (a container's cgroup, a
service's cgroup, or a login session's autogroup), so the DNS process runs ``dns.cpu_priority`` nice
steps below the mirror process. It lowers its own nice value where that is allowed (root with
``CAP_SYS_NICE``, or a high enough ``RLIMIT_NICE``); where it is not (a container whose capabilities
were dropped, an ordinary user's ``make run``) the mirror process raises its own instead, which needs
no privilege. Either way the gap between the two is the same, and it is reported.

The DNS process also starts a session of its own: where the kernel groups processes by session
(``kernel.sched_autogroup_enabled``, on by default on Debian), a new session is a scheduling group of
its own, so the DNS process is woken as itself rather than as a share of the busy mirror's group, as a
resolver started as its own service would be. There its nice value counts only inside its own group, so
when it could raise its priority, its group gets the same raise (``/proc/self/autogroup``; the group is
its alone). Inside a cgroup (a pod, a service) there is no autogroup and this changes nothing.

A nice value is a share, not a turn: a woken DNS process still waits for the running task's slice, so
where it may (``dns.realtime``, root or ``CAP_SYS_NICE``) it also runs at the lowest real-time priority
(``SCHED_RR`` 1), which the kernel runs as soon as it is woken, before any ordinary task and after
every other real-time one. It keeps that priority only while it answers like a resolver: a process
that takes more than :func:`realtime_share` of a core (a flood of queries), or runs
:data:`REALTIME_RUN_LIMIT` without waiting for anything (a loop), goes back to its nice value for
:data:`REALTIME_COOL_DOWN`, so it can never starve the node.

Even at real-time priority a woken process waits for its core: while the hypervisor runs another guest on
it (``steal`` in /proc/stat) or the kernel finishes a long system call of another task there. So
``dns.processes`` DNS processes may answer on the same sockets, each pinned to a core of its own
(:func:`answering_cores`): every query wakes them all, the first to run reads it, and a core held
elsewhere holds no answer. The real-time budget is the whole DNS's, shared among them.

Real-time priority pays only on a busy machine. Where cores are idle the kernel wakes a real-time task
on an idle core rather than where its query was sent from, and on a VM an idle core must first be woken
by the hypervisor, which can take milliseconds: an ordinary task, woken the ordinary way, answers sooner
there. So the DNS process holds the priority only while the machine is busy (:class:`MachineLoad`: fewer
than :data:`REALTIME_IDLE_CORES` idle on average since the last check), and answers at its nice value while
cores are idle.

:func:`yield_steps`, :func:`answering_cores`, :class:`RealtimeBudget` and :class:`MachineLoad` are the
decisions; the functions around them only read and set nice values, scheduling policies and cores.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterable

log = logging.getLogger("dnsmirror.dns")

NICE_MAX = 19
NICE_MIN = -20
# the lowest real-time priority: before every ordinary task, after the kernel's and the node's real-time ones
REALTIME_PRIORITY = 1
# CPU a real-time DNS process may take, as a share of the machine's CPU time and at most of one core's, over
# each check: on two cores 0.8 of one core, a few thousand queries a second here (more than a node's own
# clients ask), leaving the rest of the machine 1.2 cores' time
REALTIME_MACHINE_SHARE = 0.4
REALTIME_CORE_SHARE = 0.8
# seconds a DNS process that went over its share runs at its nice value before it is real-time again
REALTIME_COOL_DOWN = 5.0
# seconds of CPU a real-time process may run without a blocking call: past the first the kernel sends
# SIGXCPU (the process goes back to its nice value), past the second SIGKILL (its parent starts a new one)
REALTIME_RUN_LIMIT = (0.2, 2.0)
# real-time priority pays only while a woken task may find every core busy: the DNS process takes it once
# fewer than the first of these idle cores were left on average since the last check, and leaves it once
# more than the second were. With cores idle it costs: the kernel wakes a real-time task on an idle core,
# which on a VM the hypervisor must wake first (measured in bench/README.md)
REALTIME_IDLE_CORES = (0.6, 0.9)
# checks in a row with that many idle before it lets go: a busy machine has idle moments (a stream between
# two blobs), and each would cost a stream's time slice
REALTIME_IDLE_CHECKS = 4


def yield_steps(mirror_nice: int, dns_nice: int, gap: int) -> int:
    """How many nice steps the mirror process must lower its own priority by so that the DNS process runs
    ``gap`` steps above it (0 when it already does; never past the lowest priority, 19)."""
    wanted = min(dns_nice + gap, NICE_MAX)
    return max(0, wanted - mirror_nice)


def raise_own(gap: int) -> int:
    """In the DNS process: lower this process's nice value by ``gap`` where allowed; returns the nice value
    it runs at. A refusal (no ``CAP_SYS_NICE``) leaves it as it was: the mirror process yields instead."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if gap <= 0:
        return before
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(before - gap, NICE_MIN))
    except OSError as exc:
        log.debug("the DNS process keeps nice %d (%s): the mirror process yields instead", before, exc)
    return os.getpriority(os.PRIO_PROCESS, 0)


def raise_own_group(steps: int) -> None:
    """In the DNS process, once it leads a session of its own: raise that session's scheduling group
    (autogroup) by ``steps`` as well; nothing where the kernel has no autogroup or refuses (no
    ``CAP_SYS_NICE``)."""
    if steps <= 0:
        return
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write(str(max(-steps, NICE_MIN)))
    except OSError as exc:
        log.debug("the DNS process's scheduling group keeps its weight: %s", exc)


def own_session() -> bool:
    """In the DNS process: start a session of its own (a scheduling group of its own under autogroup);
    False when it could not (it leads a process group already)."""
    try:
        os.setsid()
    except OSError as exc:
        log.debug("the DNS process stays in the mirror's session: %s", exc)
        return False
    return True


def nice_of(pid: int) -> int | None:
    """The nice value of process ``pid`` (of its main thread); None when it is gone."""
    try:
        return os.getpriority(os.PRIO_PROCESS, pid)
    except OSError:
        return None


def lower_own(steps: int) -> int:
    """In the mirror process: raise the nice value of every thread of this process by ``steps`` (Linux keeps
    one per thread; threads started later inherit it). Returns the main thread's nice value after."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if steps <= 0:
        return current
    target = min(current + steps, NICE_MAX)
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(target, os.getpriority(os.PRIO_PROCESS, tid)))
        except OSError as exc:  # a thread that just ended
            log.debug("thread %d keeps its nice value: %s", tid, exc)
    return os.getpriority(os.PRIO_PROCESS, 0)


class NiceValues:
    """The mirror process's view of nice values (a fake stands in for it in tests)."""

    def of(self, pid: int) -> int | None:
        return nice_of(pid)

    def own(self) -> int:
        return os.getpriority(os.PRIO_PROCESS, 0)

    def lower_own(self, steps: int) -> int:
        return lower_own(steps)


def realtime_share(cores: int) -> float:
    """The share of one core a real-time DNS process may take on a machine of ``cores`` (at most
    :data:`REALTIME_MACHINE_SHARE` of all their time, and :data:`REALTIME_CORE_SHARE` of one)."""
    return min(REALTIME_CORE_SHARE, REALTIME_MACHINE_SHARE * max(cores, 1))


def answering_cores(allowed: Iterable[int], processes: int) -> list[int | None]:
    """The core each DNS process is pinned to: ``processes`` of them spread over the ``allowed`` cores, at
    most one per core. Where that leaves fewer than two, one process, on no core of its own (``[None]``)."""
    cores = sorted(allowed)
    count = min(processes, len(cores))
    if count < 2:
        return [None]
    return [cores[index * len(cores) // count] for index in range(count)]


def pin_to_core(core: int) -> str | None:
    """Run this process on ``core`` only; None when it does, else why not (a core outside its cpuset)."""
    try:
        os.sched_setaffinity(0, {core})
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class RealtimeBudget:
    """When the DNS process may run at real-time priority: while it takes at most ``share`` of a core
    between two checks; once it took more (or overran its run limit), not for ``cool_down`` seconds."""

    def __init__(self, share: float, cool_down: float = REALTIME_COOL_DOWN) -> None:
        self.share = share
        self.cool_down = cool_down
        self.until = float("-inf")  # at real-time priority again from this time on
        self._last: tuple[float, float] | None = None  # (time, CPU seconds) at the last check

    def allowed(self, now: float, cpu_seconds: float) -> bool:
        """Whether the process may be real-time now, given its CPU seconds so far; call it periodically."""
        last, self._last = self._last, (now, cpu_seconds)
        if last is not None and now > last[0] and (cpu_seconds - last[1]) / (now - last[0]) > self.share:
            self.overran(now)
        return now >= self.until

    def overran(self, now: float) -> None:
        """The process went over its budget at ``now`` (the kernel said so: SIGXCPU)."""
        self.until = now + self.cool_down


class MachineLoad:
    """Whether the machine is busy enough for real-time priority to pay, from its CPU ticks
    (:func:`machine_ticks`) read at each check: busy once fewer than ``idle_cores[0]`` cores were idle on
    average since the last reading, idle once more than ``idle_cores[1]`` were at ``idle_checks`` readings
    in a row, and otherwise (or with no reading to compare to) as it was."""

    def __init__(self, idle_cores: tuple[float, float] = REALTIME_IDLE_CORES,
                 idle_checks: int = REALTIME_IDLE_CHECKS, busy: bool = True) -> None:
        self.busy_below, self.idle_above = idle_cores
        self.idle_checks = idle_checks
        self.busy = busy
        self._idle_run = 0  # readings in a row with more than idle_above cores idle
        self._last: tuple[int, int] | None = None  # (idle ticks, all ticks) at the last reading

    def update(self, ticks: tuple[int, int, int] | None) -> bool:
        """Whether the machine is busy, given ``(idle ticks, all ticks, cores)`` now (None: unreadable)."""
        if ticks is None:
            return self.busy
        idle, total, cores = ticks
        last, self._last = self._last, (idle, total)
        if last is not None and total > last[1] and idle >= last[0]:
            idle_cores = cores * (idle - last[0]) / (total - last[1])
            self._idle_run = self._idle_run + 1 if idle_cores > self.idle_above else 0
            if idle_cores < self.busy_below:
                self.busy = True
            elif self._idle_run >= self.idle_checks:
                self.busy = False
        return self.busy


def machine_ticks(path: str = "/proc/stat") -> tuple[int, int, int] | None:
    """The whole machine's CPU time so far: (idle ticks, all ticks, cores), idle counting the time waiting for
    I/O and all counting the time the hypervisor ran something else (``steal``); None when unreadable."""
    try:
        with open(path) as stat:
            lines = stat.read().splitlines()
        fields = [int(value) for value in lines[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    if len(fields) < 5 or cores < 1:
        return None
    return fields[3] + fields[4], sum(fields), cores


def set_realtime(enabled: bool) -> str | None:
    """Run this thread at :data:`REALTIME_PRIORITY` (``SCHED_RR``), or as an ordinary task at its nice value;
    None when it runs as asked, else why not. Real-time needs root with ``CAP_SYS_NICE`` (or an
    ``RLIMIT_RTPRIO``), and a kernel that allows it in this cgroup: one built with ``CONFIG_RT_GROUP_SCHED``
    gives a container's cgroup no real-time time at all."""
    policy, level = (os.SCHED_RR, REALTIME_PRIORITY) if enabled else (os.SCHED_OTHER, 0)
    try:
        os.sched_setscheduler(0, policy, os.sched_param(level))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def limit_realtime_runs(limits: tuple[float, float] = REALTIME_RUN_LIMIT) -> bool:
    """Have the kernel stop a real-time run that never waits (``RLIMIT_RTTIME``): SIGXCPU after the first
    limit, SIGKILL after the second (or a lower limit already set). Install a SIGXCPU handler first (its
    default ends the process). False when the limit cannot be set: then the process stays an ordinary task."""
    soft, hard = (int(seconds * 1_000_000) for seconds in limits)
    try:
        _, current = resource.getrlimit(resource.RLIMIT_RTTIME)
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(resource.RLIMIT_RTTIME, (soft, hard))
    except (OSError, ValueError) as exc:
        log.debug("no limit on real-time runs (%s): the DNS process stays an ordinary task", exc)
        return False
    return True
