"""CPU time of benchmarked processes, read from /proc."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import NamedTuple

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # the command name may hold spaces or parentheses: fields start after the last ")"
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far (processes that are gone count zero)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def process_tree(pid: int, children: int = 0, timeout: float = 10.0) -> list[int]:
    """``pid`` and its direct children (e.g. nginx's master and worker), once it has at least ``children``
    of them: a server that forks its workers after it listens (nginx) has none yet when it first answers.
    Raises RuntimeError if it has fewer after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError):
                    if int(_stat_fields(int(entry.name))[1]) == pid:
                        pids.append(int(entry.name))
        if len(pids) > children:
            return pids
        if time.monotonic() >= deadline:
            raise RuntimeError(f"process {pid} has {len(pids) - 1} children, expected {children}")
        time.sleep(0.05)


class MachineTicks(NamedTuple):
    """The machine's CPU ticks so far: in all, stolen (the hypervisor ran something else) and idle."""

    total: int
    stolen: int
    idle: int


def machine_ticks() -> MachineTicks:
    """The machine's CPU ticks so far, from the first line of /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is counted in user already
    return MachineTicks(total=sum(fields[:8]), stolen=fields[7], idle=fields[3] + fields[4])


def stolen_share(before: MachineTicks, after: MachineTicks) -> float:
    """The share of the machine's CPU time stolen between two :func:`machine_ticks` readings."""
    total = after.total - before.total
    return (after.stolen - before.stolen) / total if total > 0 else 0.0


def idle_share(before: MachineTicks, after: MachineTicks) -> float:
    """The share of the machine's CPU time idle (or waiting for I/O) between two :func:`machine_ticks`
    readings."""
    total = after.total - before.total
    return (after.idle - before.idle) / total if total > 0 else 0.0
