"""The allocator keeps freed pieces' memory: a fill's pieces do not fault their pages in again."""

from __future__ import annotations

import subprocess
import sys

from dnsmirror import allocator

# a fill's pattern: a few 1 MiB pieces live at once, then all freed; the faults of the last rounds
_PIECES = """
import resource, sys
from dnsmirror import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
def rounds(count):
    for _ in range(count):
        pieces = [bytearray(1024 * 1024) for _ in range(6)]
        del pieces
rounds(5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(100)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PIECES, mode], capture_output=True, text=True, timeout=60,
                          check=True)
    return int(done.stdout)


def test_freed_pieces_are_reused_without_faulting_their_pages_in_again() -> None:
    kept, defaults = _faults("keep"), _faults("defaults")
    # 100 rounds of 6 MiB are 153,600 pages: the defaults fault most of them in again
    assert defaults > 50_000
    assert kept < 2_000


def test_the_thresholds_leave_a_piece_on_the_heap_and_bound_what_it_keeps() -> None:
    from dnsmirror import bulk

    assert bulk.PLAIN_BUFFER < allocator.MMAP_THRESHOLD
    assert allocator.MMAP_THRESHOLD < allocator.TRIM_THRESHOLD <= 64 * 1024 * 1024
