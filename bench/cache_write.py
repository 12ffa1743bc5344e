"""CPU per GiB of writing a blob into the cache, by the size of a writer's blocks (issue 14).

One :class:`dnsmirror.store.Writer` (``O_DIRECT``, the default) takes ``--mib`` MiB in pieces of a little over
1 MiB, as a fill hands on socket reads: it copies them into its page-aligned block, hashes each full block
and writes it on a write thread while the next is staged. The process's CPU time (user and system, every
thread) per GiB is measured from the first piece to the end of :meth:`Writer.commit` (the last block, fsync,
the digest check, the rename), for each block size in turn, ``--rounds`` times in changing order. The cache
lives in a temporary directory under ``--dir`` (default /var/tmp: the machine's disk, not a memory
filesystem) and is removed afterwards.

    .venv/bin/python bench/cache_write.py --mib 1024 --rounds 4
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnsmirror import store  # noqa: E402

MiB = 1024 * 1024
BLOCK_SIZES = (1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)
# a socket read's plaintext: 1 MiB and a record left over from the read before
PIECE = MiB + 4321


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_blob(directory: Path, piece: bytes, pieces: int, digest: str,
               block_size: int) -> tuple[float, float]:
    """Writes and commits the blob with blocks of ``block_size``; returns (CPU-seconds, seconds)."""
    store.STAGE_SIZE = block_size
    with tempfile.TemporaryDirectory(dir=directory, prefix="dnsmirror-cache-write-") as root, \
            store.Store.open(root, 4 * pieces * len(piece), direct_writes=True) as cache:
        writer = cache.writer(digest, expected_size=pieces * len(piece))
        started, spent = time.monotonic(), cpu_seconds()
        for _ in range(pieces):
            writer.write(piece)
        writer.commit()  # raises if the bytes written are not the blob
        return cpu_seconds() - spent, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="MiB per blob (default 1024)")
    parser.add_argument("--rounds", type=int, default=4, help="blobs per block size (default 4)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the cache is made")
    args = parser.parse_args()
    piece, pieces = os.urandom(PIECE), args.mib * MiB // PIECE
    hasher = hashlib.sha256()
    for _ in range(pieces):
        hasher.update(piece)
    digest, gib = f"sha256:{hasher.hexdigest()}", pieces * PIECE / (1024 * MiB)
    spent: dict[int, list[float]] = {size: [] for size in BLOCK_SIZES}
    rates: dict[int, list[float]] = {size: [] for size in BLOCK_SIZES}
    for round_ in range(args.rounds):
        order = BLOCK_SIZES[round_ % len(BLOCK_SIZES):] + BLOCK_SIZES[:round_ % len(BLOCK_SIZES)]
        for size in order:
            cpu, seconds = write_blob(args.dir, piece, pieces, digest, size)
            spent[size].append(cpu / gib)
            rates[size].append(gib * 1024 * MiB / seconds / 1e6)
    print(f"{'block':>7s} {'median CPU-s per GiB':>21s} {'median MB/s':>12s}  rounds (CPU-s per GiB)")
    for size in BLOCK_SIZES:
        rounds = ", ".join(f"{value:.3f}" for value in spent[size])
        cpu, rate = statistics.median(spent[size]), statistics.median(rates[size])
        print(f"{size // MiB:5d} MiB {cpu:21.3f} {rate:12.0f}  {rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
