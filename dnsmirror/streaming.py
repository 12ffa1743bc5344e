"""Moving blob bytes without blocking the reactor and without holding a blob in memory.

- :class:`DiskIO` runs every store and file call on a dedicated thread pool.
- :class:`Fill` is one upstream fetch of one digest, written to a store's
  :class:`~dnsmirror.contracts.BlobWriter` (hashed as written, off the reactor) and readable by any
  number of waiters while it grows. The last byte is held back until the digest is verified, so no
  client ever receives a complete body whose digest is wrong. It reads upstream about as fast as its
  fastest reader takes the bytes, so that reader is served from memory. If the disk fails under it
  (full, read-only, I/O errors) the fill goes on *uncached*: the bytes its readers still need stay in
  memory, upstream goes at the pace of the slowest reader, and the hash still decides whether the last
  byte is released.
- :class:`BlobStreamer` sends a byte range of a committed blob or of a growing fill to one HTTP
  request, as a push producer: a slow client pauses the disk reads, not the other clients. Given a
  cached blob not known to be intact, it hashes what it reads (on the disk pool) and sends the last
  bytes only if the digest matches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss, Request
from zope.interface import implementer

from dnsmirror.flow import Upstream, WriteBatches, readable, upstream_action
from dnsmirror.store import BlobInfo, BlobReader, Store

if TYPE_CHECKING:
    from hashlib import _Hash

    from dnsmirror.contracts import BlobWriter, UpstreamAnswer

log = logging.getLogger("dnsmirror.streaming")

READ_CHUNK = 1024 * 1024
# the newest bytes of a fill stay in memory this long, so readers keeping up never touch the disk
RECENT_WINDOW = 8 * 1024 * 1024
# received bytes are written to disk in batches of at least this much (the last batch may be smaller)
WRITE_BATCH = 1024 * 1024
# waiters are woken per this many received bytes (and per disk write), so they send large writes
NOTIFY_STEP = 256 * 1024
# upstream is paused while this much received data waits for the disk
FILL_HIGH_WATER = 8 * 1024 * 1024
FILL_LOW_WATER = 2 * 1024 * 1024
# upstream is also paused while the leading reader is this far behind the newest byte: the fill goes at
# the pace of its fastest client, which keeps reading from memory instead of falling back to the disk
READER_LAG_HIGH = 4 * 1024 * 1024
# twice a socket read (dnsmirror.bulk.SOCKET_READ): a newest piece below this waits to go whole (see
# Fill.holds_back_newest), where sending all of it but its held-back last byte would copy it
READER_LAG_LOW = 2 * 1024 * 1024
# readers that make no progress for this long stop holding the fill back (upstream must not idle out)
READER_STALL = 5.0
# a fill whose disk failed keeps at most about this much that its slowest reader has not sent yet
UNCACHED_HIGH_WATER = 16 * 1024 * 1024
UNCACHED_LOW_WATER = 8 * 1024 * 1024


class DiskIO:
    """Store and file operations on a thread pool of their own."""

    def __init__(self, reactor: Any, store: Store | None, threads: int = 8) -> None:
        # an IReactorFromThreads for the pool's results, and the IReactorTime of fills' timers
        self.reactor = reactor
        self.store = store
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="dnsmirror-disk")

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """``function(*args)`` on the disk pool; a Deferred of its result."""
        return deferToThreadPool(self.reactor, self.pool, function, *args, **kwargs)


class FillFailed(Exception):
    """The fill ended without a verified blob (upstream error, digest mismatch, disk full)."""


class Fill:
    """One upstream body for ``digest`` flowing into the store, readable while it grows.

    Feed it with :meth:`body_protocol` (an ``IProtocol`` for ``UpstreamResponse.deliver_body``).
    ``done`` fires with the committed :class:`BlobInfo`, or fails with :class:`FillFailed`.
    """

    def __init__(
        self,
        disk: DiskIO,
        writer: BlobWriter,
        digest: str,
        total: int | None,
        content_type: str | None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.disk = disk
        # the pacing and stall timers' clock; the disk pool's reactor unless given
        self._clock: IReactorTime = clock if clock is not None else disk.reactor
        self.writer = writer
        self.digest = digest
        self.total = total
        self.content_type = content_type
        self.temp_path = writer.temp_path
        self.started = time.monotonic()
        self.received = 0
        self._notified = 0
        self.written = 0
        self._recent: deque[tuple[int, bytes]] = deque()
        self._recent_bytes = 0
        self.verified = False
        self.failure: FillFailed | None = None
        self.done: defer.Deferred[BlobInfo] = defer.Deferred()
        self._batches = WriteBatches(WRITE_BATCH, FILL_HIGH_WATER, FILL_LOW_WATER)
        self._upstream: IPushProducer | None = None
        self._upstream_paused = False
        self._disk_paused = False
        self._readers: set[BlobStreamer] = set()
        self._lead = 0  # the furthest offset any attached reader has sent
        self._reader_paused = False
        self._pacing = True
        self._progress_at = 0.0
        self._stall_timer: IDelayedCall | None = None
        self._waiters: list[defer.Deferred[None]] = []
        self.info: BlobInfo | None = None
        #: The disk failed under this fill: it streams on from memory and will not be cached.
        self.uncached = False
        self._streams: set[BlobStreamer] = set()  # every reader (ranges too): what memory must keep
        self._memory_paused = False
        self._memory_progress = 0  # the slowest reader's offset when the memory stall timer last looked
        self._memory_timer: IDelayedCall | None = None

    @property
    def upstream_paused(self) -> bool:
        """Whether upstream's body is paused now (a second source of the same body starts paused too)."""
        return self._upstream_paused

    @property
    def finished(self) -> bool:
        return self.verified or self.failure is not None

    def readable(self) -> int:
        """Bytes a waiter may send now: all of them once verified, else all received but the last."""
        return readable(self.received, self.verified)

    def can_serve(self, offset: int) -> bool:
        """Whether a new reader from ``offset`` finds every byte it needs (on disk, in memory or to come)."""
        if not self.uncached:
            return True
        memory_start = self._recent[0][0] if self._recent else self.received
        return memory_start <= max(offset, self.written)

    def from_memory(self, offset: int, size: int) -> bytes | None:
        """Up to ``size`` bytes at ``offset`` from the one received piece in memory that holds them, else
        None. A piece asked for whole is returned as it is, not copied; a reader asks again for the rest."""
        recent = self._recent
        if not recent or offset < recent[0][0]:
            return None
        index = len(recent) - 1
        while index > 0 and recent[index][0] > offset:  # readers are usually near the newest bytes
            index -= 1
        start, piece = recent[index]
        begin = offset - start
        if begin >= len(piece):
            return None
        if begin == 0 and len(piece) <= size:
            return piece
        return piece[begin:begin + size]

    def holds_back_newest(self, offset: int, limit: int) -> bool:
        """Whether a reader at ``offset`` could send only part of the newest piece (up to ``limit``): all
        of it but the last byte, held back until verification. It then waits for the next piece, or for
        verification, and sends this one whole. Only a piece below the readers' pacing window waits: a
        reader's wait must never be what pauses the upstream it waits for."""
        return (bool(self._recent) and self._recent[-1][0] == offset
                and limit == self.readable() < self.received < offset + READER_LAG_LOW)

    def _trim(self) -> None:
        # only bytes already on disk may leave memory: a reader that falls behind reads them there
        while (self._recent_bytes > RECENT_WINDOW
               and self._recent[0][0] + len(self._recent[0][1]) <= self.written):
            self._recent_bytes -= len(self._recent.popleft()[1])
        if self.uncached:
            # without a disk, memory holds what some reader still needs, and nothing else
            floor = self._slowest()
            while self._recent and self._recent[0][0] + len(self._recent[0][1]) <= floor:
                self._recent_bytes -= len(self._recent.popleft()[1])
            if self._memory_paused and self._unsent() <= UNCACHED_LOW_WATER:
                self._memory_paused = False
                self._cancel_memory_timer()
                self._flow()

    def _slowest(self) -> int:
        """The first byte some reader still needs from memory (``received`` if none does)."""
        return min((stream.offset for stream in self._streams if stream.needs_memory(self.written)),
                   default=self.received)

    def _unsent(self) -> int:
        """Bytes in memory, not on disk, that the slowest reader has not sent yet."""
        return self.received - max(self._slowest(), self.written)

    def settled(self) -> defer.Deferred[None]:
        """Fires (with None) once ``done`` has: the blob is committed (``info`` set) or the fill failed."""
        settled: defer.Deferred[None] = defer.Deferred()

        def relay(result: object) -> object:
            settled.callback(None)
            return result

        self.done.addBoth(relay)
        return settled

    def wait(self) -> defer.Deferred[None]:
        """Fires at the next progress: more bytes readable, verification, or failure."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.finished:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def _notify(self) -> None:
        self._notified = self.received
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    # --- upstream side ---------------------------------------------------------------------------------

    def body_protocol(self) -> _FillProtocol:
        return _FillProtocol(self)

    def _received(self, data: bytes) -> None:
        if self.failure is not None:
            return
        self._recent.append((self.received, data))
        self._recent_bytes += len(data)
        self.received += len(data)
        disk_behind = self._batches.received(data)
        if self.uncached:
            self._trim()
        if disk_behind and not self._disk_paused:
            self._disk_paused = True
            self._flow()
        if (self._readers and not self._reader_paused and self._pacing
                and self.received - self._lead >= READER_LAG_HIGH):
            self._pause_for_readers()
        if self.uncached and not self._memory_paused and self._unsent() >= UNCACHED_HIGH_WATER:
            self._pause_for_memory()
        self._write_next()
        if self.received - self._notified >= NOTIFY_STEP:
            self._notify()

    def _write_next(self) -> None:
        write = self._batches.next_write()
        if write is None:
            return
        chunks, size = write.chunks, write.size
        if write.last:
            self._commit(chunks)  # the last batch is written and verified in one trip to the disk thread
            return
        # the writer copies the chunks into its aligned stage in the thread, not on the reactor
        self.disk.run(self._write_chunks, chunks).addCallbacks(
            self._wrote, self._fail, callbackArgs=(size,)
        )

    def _write_chunks(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.writer.write(chunk)

    def _wrote(self, _result: None, size: int) -> None:
        disk_behind = self._batches.wrote(size)
        self.written = self.writer.bytes_in_file
        if self.writer.failure is not None and not self.uncached:
            self._go_uncached()
        self._trim()
        if self._disk_paused and not disk_behind:
            self._disk_paused = False
            self._flow()
        self._notify()
        self._write_next()

    # --- pacing: the upstream body is read about as fast as the fastest reader takes it ---------------

    def attach(self, reader: BlobStreamer) -> None:
        """``reader`` streams this fill; the fill waits for the fastest such reader (see READER_LAG_HIGH)."""
        self._readers.add(reader)
        self._lead = max(self._lead, reader.offset)

    def detach(self, reader: BlobStreamer) -> None:
        """``reader`` is done; with nobody left to wait for, the fill runs at upstream's pace."""
        self._readers.discard(reader)
        self._lead = max((other.offset for other in self._readers), default=0)
        self.reader_progress(self._lead)

    def reader_progress(self, offset: int) -> None:
        """An attached reader has sent everything before ``offset``."""
        if offset > self._lead:
            self._lead = offset
        if self.uncached:
            self._trim()
        if self._reader_paused:
            self._progress_at = self._clock.seconds()
            if not self._readers or self.received - self._lead <= READER_LAG_LOW:
                self._release_readers_hold(for_good=False)

    def register(self, stream: BlobStreamer) -> None:
        """``stream`` reads this fill (any range): if the disk fails, memory keeps what it still needs."""
        self._streams.add(stream)

    def unregister(self, stream: BlobStreamer) -> None:
        """``stream`` is done with this fill."""
        self._streams.discard(stream)
        if self.uncached:
            self._trim()
            if not self._streams and not self.finished:
                # nobody left to stream to and nothing to cache: upstream's body is not needed
                self._fail(Failure(self.writer.failure))

    # --- a disk that failed mid-fill: the body goes on from memory, uncached ------------------------

    def _go_uncached(self) -> None:
        self.uncached = True
        for stream in self._streams:
            stream.keep_tail()
        log.warning("cache disk failed mid-fill; streaming on without caching", extra={"fields": {
            "digest": self.digest, "reason": str(self.writer.failure), "cached_bytes": self.written,
        }})
        if not self._streams and not self._batches.finished:
            # nobody to stream to and nothing to cache: the rest of upstream's body is not needed
            self._fail(Failure(self.writer.failure))
            return
        self._trim()
        if not self._memory_paused and self._unsent() >= UNCACHED_HIGH_WATER:
            self._pause_for_memory()

    def _pause_for_memory(self) -> None:
        self._memory_paused = True
        self._memory_progress = self._slowest()
        self._memory_timer = self._clock.callLater(READER_STALL, self._check_memory_stall)
        self._flow()

    def _check_memory_stall(self) -> None:
        self._memory_timer = None
        slowest = self._slowest()
        if slowest > self._memory_progress:
            self._memory_progress = slowest
            self._memory_timer = self._clock.callLater(READER_STALL, self._check_memory_stall)
            return
        # a reader that took nothing for this long would hold every other reader (and upstream) back
        for stream in [stream for stream in self._streams if stream.offset == slowest]:
            stream.abort("stalled while the fill could not be cached")
        self._trim()
        if self._memory_paused and self.failure is None:
            # the next slowest reader holds memory now: it gets the same time, not for ever
            self._memory_progress = self._slowest()
            self._memory_timer = self._clock.callLater(READER_STALL, self._check_memory_stall)

    def _cancel_memory_timer(self) -> None:
        if self._memory_timer is not None and self._memory_timer.active():
            self._memory_timer.cancel()
        self._memory_timer = None

    def _pause_for_readers(self) -> None:
        self._reader_paused = True
        self._progress_at = self._clock.seconds()
        self._stall_timer = self._clock.callLater(READER_STALL, self._check_stall)
        self._flow()

    def _check_stall(self) -> None:
        self._stall_timer = None
        idle = self._clock.seconds() - self._progress_at
        if idle < READER_STALL:
            self._stall_timer = self._clock.callLater(READER_STALL - idle, self._check_stall)
            return
        log.debug("readers of %s stalled: the fill no longer waits for them", self.digest)
        self._release_readers_hold(for_good=True)

    def _release_readers_hold(self, for_good: bool) -> None:
        """Resume upstream if it waits for readers; ``for_good`` also stops pacing this fill."""
        if for_good:
            self._pacing = False
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None
        if self._reader_paused:
            self._reader_paused = False
            self._flow()

    def _flow(self) -> None:
        if self._upstream is None or self._batches.finished or self.failure is not None:
            return  # the body is over: nothing left to pause or resume
        action = upstream_action(
            self._disk_paused, self._reader_paused, self._memory_paused, self._upstream_paused
        )
        if action is Upstream.PAUSE:
            self._upstream_paused = True
            self._upstream.pauseProducing()
        elif action is Upstream.RESUME:
            self._upstream_paused = False
            self._upstream.resumeProducing()

    def _body_done(self, reason: Failure) -> None:
        if reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and self.total is None):
            self._batches.finish()
            self._release_readers_hold(for_good=True)  # cancels the stall timer
            self._write_next()
        else:
            self._fail(reason)

    def _commit(self, chunks: list[bytes]) -> None:
        if self.total is not None and self.received != self.total:
            short = f"{self.digest}: upstream sent {self.received} of {self.total} bytes"
            self._fail(Failure(FillFailed(short)))
            return
        # checked before the last batch goes to the file: its write waits in _write_and_commit instead
        self.disk.run(self.writer.verify, chunks).addCallbacks(
            self._verified, self._fail, callbackArgs=(chunks,)
        )

    def _verified(self, _result: None, chunks: list[bytes]) -> None:
        # clients get their last byte now, from memory; the last write and the durable commit (fsync,
        # rename) follow without them
        self.verified = True
        self.written = self.writer.bytes_in_file
        self.total = self.received
        if self.writer.failure is not None and not self.uncached:
            self._go_uncached()
        self._memory_paused = False
        self._cancel_memory_timer()
        self._notify()
        self.disk.run(self._write_and_commit, chunks).addCallbacks(self._committed, self._commit_failed)

    def _write_and_commit(self, chunks: list[bytes]) -> BlobInfo:
        self._write_chunks(chunks)
        return self.writer.commit()

    def _committed(self, info: BlobInfo) -> None:
        # every byte is in the file now: memory lets go of the newest ones
        self.written = self.writer.bytes_in_file
        if not self.uncached:
            self._recent.clear()
            self._recent_bytes = 0
        self.info = info
        self.done.callback(info)

    def _commit_failed(self, reason: Failure) -> None:
        # the bytes were verified and readers keep their open file and memory's newest bytes: only the
        # cache does not keep them. Whatever failed, no temp file stays (abort is a no-op once aborted)
        self.disk.run(self.writer.abort).addErrback(lambda f: log.warning("abort failed: %s", f.value))
        failure = FillFailed(f"{self.digest}: not cached: {_why(reason)}")
        failure.__cause__ = reason.value
        self.done.errback(Failure(failure))
        self.done.addErrback(lambda _: None)

    def _fail(self, reason: Failure) -> None:
        if self.failure is not None:
            return
        self.failure = reason.value if isinstance(reason.value, FillFailed) else FillFailed(
            f"{self.digest}: {_why(reason)}")
        self.failure.__cause__ = reason.value
        self._batches.fail()
        self._release_readers_hold(for_good=True)
        self._cancel_memory_timer()
        if self._upstream is not None:
            self._upstream.stopProducing()
        self.disk.run(self.writer.abort).addErrback(lambda f: log.warning("abort failed: %s", f.value))
        self._notify()
        self.done.errback(Failure(self.failure))
        self.done.addErrback(lambda _: None)


class _FillProtocol:
    """Receives the upstream body for a :class:`Fill`."""

    def __init__(self, fill: Fill) -> None:
        self.fill = fill

    def makeConnection(self, transport: IPushProducer) -> None:
        self.fill._upstream = transport

    def dataReceived(self, data: bytes) -> None:
        self.fill._received(data)

    def connectionLost(self, reason: Failure) -> None:
        self.fill._body_done(reason)


class ResumableBody:
    """Feeds a :class:`Fill` from one source; if that body breaks off early, the rest comes from another.

    ``resume(offset)`` returns a Deferred of a response whose body continues at ``offset`` (or None when
    it cannot); ``on_break(reason)`` hears why the first source ended. Only a cut transfer resumes: a
    body that was complete but wrong still fails verification at the end. Resumes at most once.
    """

    def __init__(
        self,
        fill: Fill,
        resume: Callable[[int], defer.Deferred[UpstreamAnswer | None]],
        on_break: Callable[[str], None],
    ) -> None:
        self.fill = fill
        self.inner = fill.body_protocol()
        self.resume = resume
        self.on_break = on_break
        self.resumed = False

    def makeConnection(self, transport: IPushProducer) -> None:
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        fill = self.fill
        complete = fill.total is not None and fill.received >= fill.total
        if self.resumed or complete or fill.failure is not None or reason.check(ResponseDone):
            self.inner.connectionLost(reason)
            return
        self.resumed = True
        self.on_break(_why(reason))
        d = self.resume(fill.received)
        d.addErrback(lambda failure: None)
        d.addCallback(self._continue, reason)

    def _continue(self, response: UpstreamAnswer | None, reason: Failure) -> None:
        if response is None or self.fill.failure is not None:
            self.inner.connectionLost(reason)
            return
        response.deliver_body(_Continuation(self.inner, self.fill))


class _Continuation:
    """The second source's body for a :class:`ResumableBody`: the fill's pause state carries over."""

    def __init__(self, inner: _FillProtocol, fill: Fill) -> None:
        self.inner = inner
        self.fill = fill

    def makeConnection(self, transport: IPushProducer) -> None:
        self.inner.makeConnection(transport)
        if self.fill.upstream_paused:
            transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self.inner.connectionLost(reason)


@implementer(IPushProducer)
class BlobStreamer:
    """Streams bytes ``[start, end)`` of an open file descriptor to ``request``.

    With a ``fill`` the file is the fill's growing temp file: the streamer waits for progress and
    aborts the client connection if the fill fails. ``finished`` fires True when everything was
    sent, False when the client went away or the stream was aborted.

    With ``verify`` (the expected sha256 hex digest of the whole file; only for ``start`` 0 and ``end``
    the file's size) every read is hashed on the disk pool, and the last read is sent only if the
    digest matches; otherwise the connection is aborted and ``on_damaged`` is called (on the reactor).
    ``on_intact`` is called when the digest matched.
    """

    def __init__(
        self,
        disk: DiskIO,
        request: Request,
        fd: int,
        start: int,
        end: int | None,
        fill: Fill | None = None,
        on_close: Callable[[], None] | None = None,
        verify: str | None = None,
        on_damaged: Callable[[], None] | None = None,
        on_intact: Callable[[], None] | None = None,
    ) -> None:
        self.disk = disk
        self.request = request
        self.fd = fd
        self.offset = start
        self.end = end
        self.fill = fill
        self.on_close = on_close
        self.paused = False
        self.busy = False
        self.reading = False
        self.stopped = False
        self.finished: defer.Deferred[bool] = defer.Deferred()
        if verify is not None and (start != 0 or end is None or fill is not None):
            raise ValueError("only a whole committed file can be verified while streamed")
        self.verify = verify
        self.hasher: _Hash | None = hashlib.sha256() if verify is not None else None
        self.on_damaged = on_damaged
        self.on_intact = on_intact
        self._tail: bytes | None = None  # a range's last byte, kept here while it waits for verification
        # the next piece of a committed file, read while the client was paused
        self._ahead: bytes | None = None

    def needs_memory(self, written: int) -> bool:
        """Whether this reader of an uncached fill still needs bytes that only memory holds."""
        return self._tail is None and (self.end is None or self.end > written) and not self.stopped

    def keep_tail(self) -> None:
        """A range that has everything but its last byte keeps that byte itself: memory may drop it."""
        fill = self.fill
        if (fill is not None and fill.uncached and self.end is not None and self._tail is None
                and self.offset == self.end - 1 and self.offset >= fill.written):
            self._tail = fill.from_memory(self.offset, 1)

    def start(self) -> defer.Deferred[bool]:
        """Start sending; the Deferred is :attr:`finished`."""
        if getattr(self.request, "channel", True) is None:
            # the client left while the blob was being opened: nothing to send, the descriptor is released
            self._close(False)
            return self.finished
        fill = self.fill
        # only a reader that takes the body to its end paces the fill: a shorter range ends up waiting
        # for verification (its last byte is held back), which needs the rest of the body
        if fill is not None and (self.end is None or fill.total is None or self.end >= fill.total):
            fill.attach(self)
        if fill is not None:
            fill.register(self)
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._next()
        return self.finished

    def _limit(self) -> int | None:
        if self.fill is None:
            return self.end
        readable = self.fill.readable()
        if self.end is None:
            return readable
        # a range's last byte also waits for verification: no complete response of unverified bytes
        return min(self.end, readable) if self.fill.verified else min(self.end - 1, readable)

    def _target(self) -> int | None:
        if self.end is not None:
            return self.end
        if self.fill is not None and self.fill.verified:
            return self.fill.total
        return None

    def _next(self) -> None:
        while not (self.paused or self.busy or self.stopped):
            target = self._target()
            if target is not None and self.offset >= target:
                self._close(True)
                return
            if self.fill is not None and self.fill.failure is not None:
                self.abort(f"fill failed: {self.fill.failure}")
                return
            if self._tail is not None and self.fill is not None and self.fill.verified:
                tail, self._tail = self._tail, None
                self.offset += len(tail)
                self.request.write(tail)
                continue
            limit = self._limit()
            if limit is None or self.offset >= limit:
                # a streamer without a fill has an end, which closed it at the target check above
                assert self.fill is not None
                self.keep_tail()
                self._wait_for_fill(self.fill)
                return
            size = min(READ_CHUNK, limit - self.offset)
            if self.fill is not None:
                if self.fill.holds_back_newest(self.offset, limit):
                    self._wait_for_fill(self.fill)
                    return
                # a piece in memory goes whole whatever its size (one socket read's): a part of it is a copy
                data = self.fill.from_memory(self.offset, limit - self.offset)
                if data:
                    # a reader keeping up with the fill gets the bytes as they arrive, without the disk
                    self.offset += len(data)
                    self.request.write(data)
                    self.fill.reader_progress(self.offset)
                    continue
                size = min(size, self.fill.written - self.offset)
                if size <= 0 and self.fill.uncached:
                    self.abort("bytes neither in memory nor on disk")  # cannot happen: memory keeps them
                    return
                if size <= 0:  # neither in memory nor on disk yet: wait for the writer
                    self._wait_for_fill(self.fill)
                    return
            self.busy = self.reading = True
            self._start_read(size)
            return

    def _wait_for_fill(self, fill: Fill) -> None:
        """Nothing to send until ``fill`` makes progress: go on then."""
        self.busy = True
        fill.wait().addCallback(self._progress)

    def _progress(self, _result: None) -> None:
        self.busy = False
        self._next()

    def _read(self, data: bytes) -> None:
        self.busy = self.reading = False
        if self.stopped:
            self._release()
            return
        if not data:
            self.abort("file ended early")
            return
        if self.paused:
            self._ahead = data  # read while the client's connection drained: sent when it resumes
            return
        self._deliver(data)
        self._next()
        self._read_ahead()

    def _deliver(self, data: bytes) -> None:
        self.offset += len(data)
        self.request.write(data)
        if self.fill is not None:
            self.fill.reader_progress(self.offset)

    def _read_ahead(self) -> None:
        """While the client's connection drains, the next piece of a file on disk is read already."""
        if (not self.paused or self.busy or self.stopped or self.fill is not None
                or self._ahead is not None or self.end is None):
            return
        size = min(READ_CHUNK, self.end - self.offset)
        if size <= 0:
            return
        self.busy = self.reading = True
        self._start_read(size)

    def _start_read(self, size: int) -> None:
        """Read ``size`` bytes at the offset on the disk pool (hashed when the file is verified)."""
        if self.hasher is not None:
            self.disk.run(
                _read_hashed, self.fd, size, self.offset, self.hasher, self.end, self.verify
            ).addCallbacks(self._read_checked, self._read_failed)
        else:
            self.disk.run(os.pread, self.fd, size, self.offset).addCallbacks(self._read, self._read_failed)

    def _read_checked(self, result: tuple[bytes, bool | None]) -> None:
        data, intact = result
        if intact is False:
            if self.on_damaged is not None:
                self.on_damaged()
            if not self.stopped:
                self.busy = self.reading = False
                self.abort(f"cached blob sha256:{self.verify} does not match its digest")
                return
        elif intact and self.on_intact is not None:
            self.on_intact()
        self._read(data)

    def _read_failed(self, reason: Failure) -> None:
        self.busy = self.reading = False
        if self.stopped:
            self._release()
            return
        self.abort(f"read failed: {reason.getErrorMessage()}")

    def abort(self, why: str) -> None:
        """Cut the client's connection: it must not take what was sent as a whole body."""
        log.warning("aborting a blob response: %s", why)
        transport = (getattr(self.request, "transport", None)
                     or getattr(self.request.channel, "transport", None))
        self._close(False)
        if transport is not None:
            transport.abortConnection()

    def _close(self, complete: bool) -> None:
        if self.stopped and self.finished.called:
            return
        self.stopped = True
        if self.fill is not None:
            self.fill.detach(self)
            self.fill.unregister(self)
        try:
            self.request.unregisterProducer()
        except Exception:  # noqa: BLE001 - the request may already be gone
            pass
        if complete:
            self.request.finish()
        self._release()
        if not self.finished.called:
            self.finished.callback(complete)

    def _release(self) -> None:
        # the descriptor may only be closed once no read on it is in flight in a thread
        if self.reading or self.on_close is None:
            return
        on_close, self.on_close = self.on_close, None
        on_close()

    # IPushProducer
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._ahead is not None and not self.stopped:
            ahead, self._ahead = self._ahead, None
            self._deliver(ahead)
        self._next()
        self._read_ahead()

    def stopProducing(self) -> None:
        if not self.stopped:
            self._close(False)


def _read_hashed(
    fd: int, size: int, offset: int, hasher: _Hash, end: int, expected_hex: str
) -> tuple[bytes, bool | None]:
    """(bytes read, whether the whole file hashed to ``expected_hex``, or None before its end): on the
    disk pool."""
    data = os.pread(fd, size, offset)
    hasher.update(data)
    if offset + len(data) < end and data:
        return data, None
    # the last read: nothing of it leaves before the digest is known
    return data, offset + len(data) == end and hasher.hexdigest() == expected_hex


@implementer(IPushProducer)
class VerifiedRelay:
    """Streams an upstream body straight to one client while hashing it, without caching.

    Used when the cache cannot take a blob (disk full). The newest chunk is held back until the
    body is complete and its sha256 matches ``digest``; on a mismatch or a cut body the client's
    connection is aborted, so it never receives a complete wrong body. ``done`` fires True/False.
    """

    def __init__(self, request: Request, digest: str) -> None:
        self.request = request
        self.expected = digest
        self.hash = hashlib.sha256()
        self.held = b""
        self.transport: IPushProducer | None = None
        self.done: defer.Deferred[bool] = defer.Deferred()

    def makeConnection(self, transport: IPushProducer) -> None:
        self.transport = transport
        self.request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        if self.held:
            self.request.write(self.held)
        self.held = data

    def connectionLost(self, reason: Failure) -> None:
        self.request.unregisterProducer()
        complete = reason.check(ResponseDone) is not None
        actual = "sha256:" + self.hash.hexdigest()
        if complete and actual == self.expected:
            if self.held:
                self.request.write(self.held)
            self.request.finish()
            self.done.callback(True)
            return
        log.warning("uncached stream aborted", extra={"fields": {
            "digest": self.expected, "reason": "digest mismatch" if complete else reason.getErrorMessage(),
        }})
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()
        self.done.callback(False)

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


@implementer(IPushProducer)
class FileFeed:
    """Feeds a :class:`Fill` from a local file (e.g. containerd's content store) through the disk pool.

    The fill pauses and resumes it like an upstream socket; the file is closed when the feed ends.
    """

    def __init__(self, disk: DiskIO, reader: BlobReader, fill: Fill) -> None:
        self.disk = disk
        self.reader = reader
        self.protocol = fill.body_protocol()
        self.paused = self.reading = self.stopped = False

    def start(self) -> None:
        """Read the file into the fill, on the disk pool."""
        self.protocol.makeConnection(self)
        self._next()

    def _next(self) -> None:
        if self.paused or self.reading or self.stopped:
            return
        self.reading = True
        self.disk.run(self.reader.read, READ_CHUNK).addCallbacks(self._read, self._failed)

    def _read(self, data: bytes) -> None:
        self.reading = False
        if self.stopped:
            self._close()
            return
        if not data:
            self.stopped = True
            self._close()
            self.protocol.connectionLost(Failure(ResponseDone()))
            return
        self.protocol.dataReceived(data)
        self._next()

    def _failed(self, reason: Failure) -> None:
        self.reading = False
        self.stopped = True
        self._close()
        self.protocol.connectionLost(reason)

    def _close(self) -> None:
        self.disk.run(self.reader.close)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._next()

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            if not self.reading:
                self._close()


def _why(reason: Failure) -> str:
    """A failure's message, or its type's name when the message is empty."""
    if reason.getErrorMessage():
        return reason.getErrorMessage()
    return reason.type.__name__ if reason.type is not None else "unknown failure"
