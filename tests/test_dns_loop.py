"""The DNS process's event loop: events dispatched without Twisted's logging context, failures contained."""

from __future__ import annotations

import logging
import os
import time

from twisted.internet.interfaces import IReadDescriptor
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dnsmirror.dns.loop import LeanEPollReactor


@implementer(IReadDescriptor)
class Pipe:
    """A pipe's read end; ``doRead`` reads a byte, or raises when told to."""

    def __init__(self, raises: bool = False) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.raises = raises
        self.got: list[bytes] = []
        self.lost: list[object] = []

    def fileno(self) -> int:
        return self.read_fd

    def logPrefix(self) -> str:
        return "pipe"

    def doRead(self) -> None:
        if self.raises:
            raise RuntimeError("a bug in a handler")
        self.got.append(os.read(self.read_fd, 1))

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            os.close(fd)


class LeanReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = LeanEPollReactor()
        self.pipes: list[Pipe] = []
        self.addCleanup(self._close)

    def _close(self) -> None:
        self.reactor.removeAll()
        for pipe in self.pipes:
            pipe.close()
        self.reactor._poller.close()

    def pipe(self, raises: bool = False) -> Pipe:
        pipe = Pipe(raises)
        self.pipes.append(pipe)
        self.reactor.addReader(pipe)
        return pipe

    def test_ready_descriptors_are_read(self) -> None:
        one, two = self.pipe(), self.pipe()
        os.write(one.write_fd, b"a")
        os.write(two.write_fd, b"b")
        self.reactor.doPoll(0.5)
        self.assertEqual((one.got, two.got), ([b"a"], [b"b"]))

    def test_a_handler_that_raises_is_disconnected_and_the_others_still_served(self) -> None:
        broken, working = self.pipe(raises=True), self.pipe()
        os.write(broken.write_fd, b"x")
        os.write(working.write_fd, b"y")
        self.reactor.doPoll(0.5)
        self.assertEqual(working.got, [b"y"])
        self.assertEqual(len(broken.lost), 1)
        self.assertNotIn(broken, self.reactor.getReaders())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        os.write(working.write_fd, b"z")
        self.reactor.doPoll(0.5)
        self.assertEqual(working.got, [b"y", b"z"])

    def test_a_failure_while_disconnecting_is_logged_and_the_loop_goes_on(self) -> None:
        broken, working = self.pipe(raises=True), self.pipe()

        def lost_badly(reason) -> None:
            raise RuntimeError("connectionLost failed too")

        broken.connectionLost = lost_badly  # type: ignore[method-assign]
        os.write(broken.write_fd, b"x")
        os.write(working.write_fd, b"y")
        with self.assertLogs("dnsmirror.dns", logging.ERROR) as logged:
            self.reactor.doPoll(0.5)
        self.assertIn("could not be handled", logged.output[0])
        self.assertEqual(working.got, [b"y"])
        self.flushLoggedErrors(RuntimeError)

    def test_nothing_ready_waits_for_the_timeout_and_reads_nothing(self) -> None:
        quiet = self.pipe()
        started = time.monotonic()
        self.reactor.doPoll(0.05)
        self.assertGreaterEqual(time.monotonic() - started, 0.04)  # it waited, it did not spin
        self.assertEqual(quiet.got, [])
