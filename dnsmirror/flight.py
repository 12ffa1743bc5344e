"""One result many callers wait for: the shared piece of every single-flight table.

A :class:`Flight` is settled once, with a value or a :class:`~twisted.python.failure.Failure`; each
``wait()`` before that gets its own Deferred (so one waiter cancelled, its client gone, leaves the
others waiting), each one after gets the result at once.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")


class Flight(Generic[T]):
    """A result under way, shared by every caller that asked for it meanwhile."""

    def __init__(self) -> None:
        self.settled = False
        self.result: Any = None  # a T, or the Failure every waiter errbacks with
        self._waiters: list[defer.Deferred[T]] = []

    def wait(self) -> defer.Deferred[T]:
        """A Deferred of the result (fails with its failure); already fired once settled."""
        if self.settled:
            return defer.fail(self.result) if isinstance(self.result, Failure) else defer.succeed(self.result)
        waiter: defer.Deferred[T] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def settle(self, result: T | Failure) -> None:
        """Give every waiter ``result`` (a value, or a Failure they errback with)."""
        self.result, self.settled = result, True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # a waiter whose client left was cancelled
                waiter.callback(result)
