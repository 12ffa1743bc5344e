"""A fill's flow control as pure decisions: whether upstream's body is paused, what a reader may send,
when received bytes go to the disk.

:class:`~dnsmirror.streaming.Fill` holds the state (three reasons to pause upstream: the disk is
behind, readers lag, memory is full without a disk) and the I/O; what to do with that state is decided
here, without Twisted, and tested with plain asserts and hypothesis. :class:`WriteBatches` is the
fill's write queue: it takes events (bytes received, a write done, the body over) and answers which
write to start and whether the disk is behind.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Upstream(enum.Enum):
    """What to tell upstream's body."""

    PAUSE = "pause"
    RESUME = "resume"


def upstream_action(disk_behind: bool, readers_lag: bool, memory_full: bool, paused: bool) -> Upstream | None:
    """Upstream is paused while any reason holds and resumed when none does; None when it is as it
    should be."""
    wanted = disk_behind or readers_lag or memory_full
    if wanted == paused:
        return None
    return Upstream.PAUSE if wanted else Upstream.RESUME


def readable(received: int, verified: bool) -> int:
    """Bytes a waiter may send now: all once the digest matched, else all but the last (held back, so a
    mismatch can still cut every client before its final byte)."""
    return received if verified else max(0, received - 1)


@dataclass(frozen=True)
class Write:
    """Write ``chunks`` (``size`` bytes, in order) to the disk; ``last``: the body is over, so this is
    the rest of it, written and verified in one trip (possibly no chunks at all)."""

    chunks: list[bytes]
    size: int
    last: bool


class WriteBatches:
    """Which received bytes a fill writes to the disk, and when: at most one write in flight, each
    carrying at least ``batch`` bytes (fewer, larger writes), except the last, which carries the rest
    once the body is over. The disk is *behind* from the moment ``high_water`` received bytes are
    unwritten until no more than ``low_water`` are.

    Events: :meth:`received`, :meth:`wrote`, :meth:`finish`, :meth:`fail`; after each, :meth:`next_write`
    says which write to start, if any.
    """

    def __init__(self, batch: int, high_water: int, low_water: int) -> None:
        if batch <= 0 or not 0 <= low_water < high_water:
            raise ValueError("a batch is at least one byte and the low water mark is below the high one")
        self.batch = batch
        self.high_water = high_water
        self.low_water = low_water
        self._queue: list[bytes] = []
        self.queued = 0  # bytes in the queue: received, no write started yet
        self.unwritten = 0  # bytes received and not yet written: queued or in the write in flight
        self.writing = False  # a write is in flight, or the last one has been started
        self.finished = False  # the body is over: the next write is the last
        self.failed = False
        self.disk_behind = False

    def received(self, chunk: bytes) -> bool:
        """The body brought ``chunk``; whether the disk is behind now."""
        if self.failed:
            return self.disk_behind
        self._queue.append(chunk)
        self.queued += len(chunk)
        self.unwritten += len(chunk)
        if self.unwritten >= self.high_water:
            self.disk_behind = True
        return self.disk_behind

    def wrote(self, size: int) -> bool:
        """The write of ``size`` bytes in flight is done; whether the disk is still behind."""
        self.writing = False
        self.unwritten -= size
        if self.unwritten <= self.low_water:
            self.disk_behind = False
        return self.disk_behind

    def finish(self) -> None:
        """The body is over: whatever is queued goes out in the last write."""
        self.finished = True

    def fail(self) -> None:
        """The fill failed: the queue is dropped and no write starts any more."""
        self.failed = True
        self._queue = []

    def next_write(self) -> Write | None:
        """The write to start now (it is in flight from here on), or None."""
        if self.writing or self.failed:
            return None
        if not self.finished and self.queued < self.batch:
            # readers are served from memory meanwhile; the disk gets fewer, larger writes
            return None
        write = Write(self._queue, self.queued, last=self.finished)
        self._queue = []
        self.queued = 0
        self.writing = True
        return write
