"""Runs every benchmark of bench/ in sequence (what ``make bench`` does); each rewrites its section of
bench/RESULTS.md. One failing benchmark does not stop the others; the exit status says whether all passed.

    .venv/bin/python bench/run.py [--only dns|tls|mirror|cold|peers|burst ...] [--no-write]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name -> script and its arguments, in the order they run; the commands are those quoted in RESULTS.md
BENCHMARKS: dict[str, list[str]] = {
    "dns": ["dns_bench.py", "--seconds", "5"],
    "tls": ["tls_handshake.py", "--seconds", "5"],
    "mirror": ["mirror_bench.py"],
    "cold": ["mirror_bench.py", "--cold-only", "--runs", "9"],
    "peers": ["peer_bench.py", "--runs", "5", "--blob-mib", "256"],
    "burst": ["burst_bench.py", "--nodes", "5", "--blob-mib", "64", "--rate-mbit", "200", "--runs", "5"],
}
# generous upper bounds: a hung benchmark must not hang `make bench`
TIMEOUT_SECONDS = {"dns": 2400, "tls": 300, "mirror": 900, "cold": 1500, "peers": 600, "burst": 600}


def run(command: list[str], timeout: float) -> int | str:
    """Run one benchmark; past ``timeout`` it gets SIGTERM (so it removes what it created), then SIGKILL."""
    process = subprocess.Popen(command, cwd=BENCH.parent)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return "timeout"
    except BaseException:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        raise


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run only these (repeatable)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print results only; leave bench/RESULTS.md alone"
    )
    args = parser.parse_args()
    failed = []
    for name, (script, *script_args) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        if args.no_write:
            script_args = [*script_args, "--no-write"]
        command = [sys.executable, str(BENCH / script), *script_args]
        print(f"== {name}: {' '.join(command)}", flush=True)
        started = time.monotonic()
        status = run(command, TIMEOUT_SECONDS[name])
        print(
            f"== {name}: {'ok' if status == 0 else f'FAILED ({status})'} in "
            f"{time.monotonic() - started:.0f}s",
            flush=True,
        )
        if status != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
