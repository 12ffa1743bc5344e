"""CPU time of benchmarked processes, read from /proc."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

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


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children (e.g. nginx's master and worker)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError):
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    pids.append(int(entry.name))
    return pids


def machine_ticks() -> tuple[int, int]:
    """The machine's CPU ticks so far, in all and those stolen (the hypervisor ran another guest)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is counted in user already
    return sum(fields[:8]), fields[7]


def stolen_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU time stolen between two :func:`machine_ticks` readings."""
    total = after[0] - before[0]
    return (after[1] - before[1]) / total if total > 0 else 0.0
