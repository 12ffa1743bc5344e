"""Periodic work that no exception can stop.

A ``LoopingCall`` stops for good when its function raises or its Deferred fails, and a hand-made
``callLater`` chain stops when the function raises before it rescheduled itself: one out-of-descriptors
error then ends the cache announcements or the health probe for the life of the process. :class:`Periodic`
schedules the next round before it runs this one, logs whatever the round raised, and never overlaps
rounds (a round still running when the next is due is skipped, not stacked).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from dnsmirror.logs import fields

log = logging.getLogger("dnsmirror.periodic")


class Periodic:
    """Calls ``work()`` every ``interval`` seconds on ``clock`` (a reactor or ``task.Clock``) until stopped.

    ``work`` may return ``None``, a Deferred (the round lasts until it fires), or a number: the delay
    before the next round instead of ``interval`` (a loop that retries sooner while it waits for something).
    ``first`` is the delay before the first round (0: at once, within :meth:`start`).
    """

    def __init__(self, clock: IReactorTime, interval: float, work: Callable[[], Any], name: str,
                 first: float | None = None) -> None:
        self.clock = clock
        self.interval = interval
        self.work = work
        self.name = name
        self.first = interval if first is None else first
        self.rounds = 0
        self.errors = 0
        self._call: IDelayedCall | None = None
        self._running: defer.Deferred[Any] | None = None
        self._stopped = True

    @property
    def running(self) -> bool:
        return not self._stopped

    def start(self) -> None:
        """Schedule the first round after ``first`` seconds."""
        self._stopped = False
        if self.first <= 0:
            self._round()
        else:
            self._schedule(self.first)

    def stop(self) -> None:
        """No more rounds; a round under way finishes on its own."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self.clock.callLater(max(0.0, delay), self._round)

    def _round(self) -> None:
        self._call = None
        if self._stopped:
            return
        # the next round is booked before this one runs, so nothing this round does can end the loop
        self._schedule(self.interval)
        if self._running is not None:
            log.debug("%s: previous round still running, skipping this one", self.name)
            return
        self.rounds += 1
        try:
            outcome = self.work()
        except Exception:  # noqa: BLE001 - any failure of one round is logged; the loop goes on
            self._failed_round(None)
            return
        if isinstance(outcome, defer.Deferred):
            self._running = outcome
            outcome.addErrback(self._failed_round)
            outcome.addBoth(self._round_done)
        elif isinstance(outcome, int | float) and not isinstance(outcome, bool) and not self._stopped:
            self._schedule(float(outcome))

    def _round_done(self, _result: object) -> None:
        self._running = None

    def _failed_round(self, failure: Failure | None) -> None:
        self.errors += 1
        if failure is None:
            log.exception("%s failed; next round in %.0f s", self.name, self.interval,
                          extra=fields(event="periodic_failed", loop=self.name))
        else:
            log.error(
                "%s failed; next round in %.0f s: %s",
                self.name,
                self.interval,
                failure.getErrorMessage(),
                exc_info=(failure.type, failure.value, failure.getTracebackObject()),  # type: ignore[no-untyped-call]
                extra=fields(event="periodic_failed", loop=self.name),
            )
