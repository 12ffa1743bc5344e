"""A fill's flow control as pure decisions: whether upstream's body is paused, what a reader may send.

:class:`~dnsmirror.streaming.Fill` holds the state (three reasons to pause upstream: the disk is
behind, readers lag, memory is full without a disk) and the I/O; what to do with that state is decided
here, without Twisted, and tested with plain asserts and hypothesis.
"""

from __future__ import annotations

import enum


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
