"""The C allocator keeps the memory a blob's pieces are freed into, for the next pieces.

A cold fill allocates and frees pieces of up to :data:`dnsmirror.bulk.SOCKET_READ` bytes about a thousand
times per GiB. glibc's defaults give the kernel back any free memory over a few MiB at the heap's top, so the
next piece faults its pages in again, one by one (about 50 faults per MiB received on a cold fill, and on a
virtual machine a fault is dear). Pieces smaller than :data:`MMAP_THRESHOLD` come from the heap instead of a
mapping of their own, and the heap keeps up to :data:`TRIM_THRESHOLD` of free memory at its top: the process
keeps what its busiest moment used (a few tens of MiB at most), no more.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# allocations this size or larger get a mapping of their own, returned whole when freed
MMAP_THRESHOLD = 4 * 1024 * 1024
# free memory at the heap's top beyond this goes back to the kernel
TRIM_THRESHOLD = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Sets the allocator's thresholds; returns whether it took them (False where the C library is not glibc,
    which then keeps its own defaults)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        log.debug("event=allocator_defaults reason=no_mallopt")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(mapped) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
