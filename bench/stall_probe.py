"""How late a timer wakes on this machine: the floor under any answer latency measured here.

Sleeps ``--interval`` seconds over and over for ``--seconds`` and prints, one per line, how many
milliseconds each wake-up came after it was due. Run it at real-time priority (``chrt -f 50``): then
no task of the machine delays it, and what is left is the kernel's and the hypervisor's (a vCPU the
host does not run, a stretch of kernel code that cannot be preempted). A DNS answer cannot come sooner
than its server is woken, so under the same load no server's p99 goes below this probe's.
"""

from __future__ import annotations

import argparse
import time


def lateness(seconds: float, interval: float) -> list[float]:
    """Milliseconds each wake-up of a ``interval`` sleep came late, for ``seconds``."""
    late = []
    end = time.monotonic() + seconds
    while True:
        before = time.monotonic()
        if before >= end:
            return late
        time.sleep(interval)
        late.append((time.monotonic() - before - interval) * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--interval", type=float, default=0.0005, help="seconds of each sleep")
    args = parser.parse_args()
    print("\n".join(f"{value:.4f}" for value in lateness(args.seconds, args.interval)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
