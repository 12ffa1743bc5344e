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

:func:`yield_steps` is the decision; the functions around it only read and set nice values.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("dnsmirror.dns")

NICE_MAX = 19
NICE_MIN = -20


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
