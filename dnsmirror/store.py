"""Content-addressed blob cache on disk: crash-safe commits, a size limit, LRU eviction.

Layout under the cache root::

    <root>/lock                          held (flock) by the one process using this cache
    <root>/tmp/<...>.part                blobs being written; removed at start
    <root>/blobs/sha256/<2 hex>/<hex>    committed blobs, named by their verified digest
    <root>/blobs/sha256/<2 hex>/<hex>.meta  sidecar: {"digest", "size", "content_type"}

Every path is built from a validated sha256 hex string, never from request text, so no request
can name a file outside the root. A blob becomes visible only by an atomic rename after its bytes
were fsynced and their sha256 matched the expected digest; a crash leaves at most a temp file,
removed by :meth:`Store.open`. The sidecar holds no credentials, only what a response needs.
Last access is the blob file's mtime (touched on reads), so LRU order survives a restart without
rewriting the sidecar.

A committed file can still go bad (a damaged disk, a stray write). Each entry remembers the file it
last found matching its digest, as a mark (inode, size, mtime, ctime): set at commit (the bytes were
hashed as they were written) and by :meth:`Store.verify_reader`. A reader whose file no longer has
that mark (any write changes the ctime) is unverified, and its caller must hash it before a client
may keep its bytes; a damaged file is dropped with :meth:`Store.drop_damaged`. Entries found on disk
at start are unverified. Before a write starts, :meth:`Store.make_room` compares the free space of
the filesystem with the blob's size; a write that fails anyway (full, read-only or failing disk)
stops writing, keeps hashing, and is never committed (see :class:`Writer`).

BLOCKING BY DESIGN: everything here does synchronous file I/O and hashing. Callers in the Twisted
process run these calls in a thread pool (``twisted.internet.threads.deferToThreadPool``), never
on the reactor thread. The classes are thread-safe. This module must not import Twisted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger("dnsmirror.store")

_SHA256_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")
_CONTENT_TYPE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")
_SIDECAR_SUFFIX = ".meta"
# errors that mean "no room": the caller should keep streaming without caching
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Writers move bytes to the file in blocks of this size (a multiple of any O_DIRECT alignment), each in one
#: huge page where the kernel allows (see :func:`stage_block`). Each block costs a hand-over to a write thread
#: and a system call: 1 MiB blocks cost 0.06 to 0.1 CPU-seconds per GiB more, blocks above 2 MiB save little
#: more (bench/cache_write.py); a writer holds two.
STAGE_SIZE = 2 * 1024 * 1024
# O_DIRECT writes must be a multiple of the logical block size; 4096 covers every common device
DIRECT_ALIGNMENT = 4096
#: Free space a new blob must leave on the filesystem (sidecars, directories, the last partial block).
ROOM_MARGIN = 1024 * 1024
VERIFY_CHUNK = 1024 * 1024
# a writer's blocks go to the file on these threads, one block per writer at a time, while the thread that
# called write() hashes and stages the next block: the disk and the hash work at the same time
_FILE_WRITES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dnsmirror-cache-write")


class StoreError(Exception):
    """Base class of the errors this module raises on purpose."""


class InvalidDigest(StoreError, ValueError):
    """Not a ``sha256:<64 lower-case hex>`` digest: nothing on disk can be named by it."""


class DigestMismatch(StoreError):
    """The written bytes do not hash to the expected digest; nothing was kept."""

    def __init__(self, expected: str, actual: str | None, size: int, message: str | None = None):
        self.expected = expected
        self.actual = actual
        self.size = size
        super().__init__(message or f"content of {size} bytes has digest {actual}, expected {expected}")


class SizeMismatch(DigestMismatch):
    """The written bytes are longer or shorter than the announced size; nothing was kept."""

    def __init__(self, expected: str, expected_size: int, size: int):
        self.expected_size = expected_size
        super().__init__(
            expected, None, size, f"content of {expected} is {size} bytes, expected {expected_size}"
        )


class StoreFull(StoreError):
    """No room to cache this blob (disk full or larger than the cache); serve it without caching."""


class StoreLocked(StoreError):
    """Another process (or another open Store) already uses this cache directory."""


def digest_hex(digest: object) -> str:
    """The hex part of a ``sha256:<hex>`` digest (a string or anything whose ``str`` is one).

    Raises :class:`InvalidDigest` for anything else; this is the only way a path is derived.
    """
    match = _SHA256_DIGEST.fullmatch(digest if isinstance(digest, str) else str(digest))
    if match is None:
        raise InvalidDigest(f"not a sha256 digest: {str(digest)[:100]!r}")
    return match.group(1)


@dataclass(frozen=True)
class BlobInfo:
    """What the cache knows about one committed blob."""

    digest: str
    size: int
    content_type: str | None
    last_access: float


class BlobReader:
    """An open blob, pinned against eviction until :meth:`close` (also a context manager).

    ``file`` is an unbuffered binary file (``read``, ``readinto``, ``seek``, ``fileno``).
    """

    def __init__(self, file: Any, info: BlobInfo, release: Callable[[], None] | None = None,
                 verified: bool = False, mark: tuple[int, int, int, int] | None = None):
        self.file = file
        self.info = info
        self.size = info.size
        #: The file is the one last found to match the digest (see :meth:`Store.verify_reader`).
        self.verified = verified
        #: The opened file's identity and change stamps (see :func:`file_mark`).
        self.mark = mark
        self._release = release

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes (all remaining bytes if negative)."""
        return self.file.read(size) or b""

    def seek(self, offset: int) -> None:
        """Move to ``offset`` bytes from the start (for Range requests)."""
        self.file.seek(offset)

    def close(self) -> None:
        """Close the file and release the pin; safe to call twice."""
        release, self._release = self._release, None
        try:
            self.file.close()
        finally:
            if release is not None:
                release()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class _Entry:
    size: int
    last_access: float
    content_type: str | None = None
    sidecar_loaded: bool = False
    last_touch: float = 0.0
    verified_mark: tuple[int, int, int, int] | None = None  # the file last found matching the digest


def file_mark(info: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a file's content short of reading it: inode, size, mtime, ctime (any write moves
    ctime)."""
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_content_type(content_type: str | None) -> str | None:
    # keep only a plausible header value: it is replayed to clients as Content-Type
    if content_type and _CONTENT_TYPE.fullmatch(content_type):
        return content_type
    return None


class Store:
    """The on-disk cache. Create it with :meth:`open`; see the module docstring for the layout.

    ``max_size`` bounds the sum of committed blob sizes (bytes); after each commit the least
    recently used blobs that are neither open for reading nor being written are removed until
    the total fits. ``clock`` gives the time used for last-access stamps; ``touch_interval`` is
    the minimum time between two mtime updates of one blob on reads.
    """

    def __init__(
        self,
        root: Path,
        max_size: int,
        clock: Callable[[], float],
        touch_interval: float,
        lock_fd: int,
        direct_writes: bool = False,
    ):
        self.root = root
        self.max_size = max_size
        #: New blobs are written with O_DIRECT where the filesystem allows (see :class:`Writer`).
        self.direct_writes = direct_writes
        self._clock = clock
        self._touch_interval = touch_interval
        self._lock_fd: int | None = lock_fd
        self._blobs_dir = root / "blobs" / "sha256"
        self._tmp_dir = root / "tmp"
        self._lock = threading.Lock()
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        self._total = 0
        #: Number of blobs removed by eviction since open (for metrics).
        self.evictions = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        max_size: int,
        *,
        clock: Callable[[], float] = time.time,
        touch_interval: float = 60.0,
        direct_writes: bool = False,
    ) -> Store:
        """Create or reopen the cache at ``root``: lock it, remove leftovers, scan sizes, evict.

        Raises :class:`StoreLocked` if another open Store holds the directory. A directory on a
        read-only filesystem opens too: what it holds is served, nothing new is cached.
        """
        root = Path(root)
        try:
            (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            (root / "tmp").mkdir(exist_ok=True)
            # read-only: flock needs no write access, and no open write keeps a remount read-only from working
            lock_fd = os.open(root / "lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            log.warning("cache directory is on a read-only filesystem: nothing new will be cached",
                        extra={"fields": {"dir": str(root)}})
            lock_fd = os.open(root / "lock" if (root / "lock").exists() else root, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreLocked(f"cache directory {root} is in use by another process") from None
        store = cls(root, max_size, clock, touch_interval, lock_fd, direct_writes)
        try:
            store._recover()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Release the directory lock; open readers stay valid. Safe to call twice."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _recover(self) -> None:
        removed_tmp = 0
        for leftover in self._tmp_dir.iterdir() if self._tmp_dir.is_dir() else ():
            # a crash mid-write leaves temp files: they were never visible, drop them
            try:
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            except OSError as exc:  # a read-only disk: they stay, unused
                log.warning("cannot remove a temp file: %s", exc)
                continue
            removed_tmp += 1
        found: list[tuple[float, str, int]] = []
        orphans = 0
        for shard in self._blobs_dir.iterdir() if self._blobs_dir.is_dir() else ():
            if not _SHARD.fullmatch(shard.name) or not shard.is_dir() or shard.is_symlink():
                continue
            names = {entry.name for entry in shard.iterdir()}
            for name in names:
                if name.endswith(_SIDECAR_SUFFIX):
                    blob_name = name[: -len(_SIDECAR_SUFFIX)]
                    if _HEX64.fullmatch(blob_name) and blob_name not in names:
                        # a crash between the sidecar rename and the blob rename
                        with contextlib.suppress(OSError):
                            (shard / name).unlink(missing_ok=True)
                            orphans += 1
                    continue
                if not _HEX64.fullmatch(name) or name[:2] != shard.name:
                    continue
                info = (shard / name).lstat()
                if not stat.S_ISREG(info.st_mode):
                    continue
                found.append((info.st_mtime, name, info.st_size))
        found.sort()
        with self._lock:
            for mtime, hex_, size in found:
                self._index[hex_] = _Entry(size=size, last_access=mtime, last_touch=mtime)
                self._total += size
            evicted = self._evict_locked(self.max_size)
        log.info(
            "cache opened",
            extra={
                "fields": {
                    "dir": str(self.root),
                    "blobs": len(self._index),
                    "bytes": self._total,
                    "max_bytes": self.max_size,
                    "removed_temp_files": removed_tmp,
                    "removed_orphan_sidecars": orphans,
                    "evicted": len(evicted),
                }
            },
        )

    # -- paths -------------------------------------------------------------------------------

    def blob_path(self, digest: object) -> Path:
        """Where the blob for ``digest`` lives (whether or not it exists); validates the digest."""
        hex_ = digest_hex(digest)
        return self._blobs_dir / hex_[:2] / hex_

    def _sidecar_path(self, hex_: str) -> Path:
        return self._blobs_dir / hex_[:2] / (hex_ + _SIDECAR_SUFFIX)

    # -- accounting --------------------------------------------------------------------------

    @property
    def total_size(self) -> int:
        """Sum of the sizes of committed blobs, in bytes."""
        return self._total

    @property
    def blob_count(self) -> int:
        """Number of committed blobs."""
        return len(self._index)

    def digests(self) -> list[str]:
        """Every committed digest, most recently used last."""
        with self._lock:
            return [f"sha256:{hex_}" for hex_ in self._index]

    def __contains__(self, digest: object) -> bool:
        return digest_hex(digest) in self._index

    def _pin(self, hex_: str) -> None:
        self._pins[hex_] = self._pins.get(hex_, 0) + 1

    def _unpin(self, hex_: str) -> None:
        with self._lock:
            count = self._pins.get(hex_, 0) - 1
            if count > 0:
                self._pins[hex_] = count
            else:
                self._pins.pop(hex_, None)

    def pinned(self, digest: object) -> int:
        """How many readers and writers currently hold ``digest`` (for tests and metrics)."""
        return self._pins.get(digest_hex(digest), 0)

    # -- reads -------------------------------------------------------------------------------

    def stat(self, digest: object) -> BlobInfo | None:
        """Metadata of a committed blob, or ``None``; does not count as an access."""
        hex_ = digest_hex(digest)
        with self._lock:
            entry = self._index.get(hex_)
            if entry is None:
                return None
        self._load_sidecar(hex_, entry)
        return BlobInfo(f"sha256:{hex_}", entry.size, entry.content_type, entry.last_access)

    def open_blob(self, digest: object) -> BlobReader | None:
        """Open a committed blob for reading, pinned until the reader is closed; ``None`` if absent."""
        hex_ = digest_hex(digest)
        now = self._clock()
        with self._lock:
            entry = self._index.get(hex_)
            if entry is None:
                return None
            self._pin(hex_)
            self._index.move_to_end(hex_)
            entry.last_access = now
        path = self._blobs_dir / hex_[:2] / hex_
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            self._unpin(hex_)
            self._forget(hex_, "blob file missing")
            return None
        file = os.fdopen(fd, "rb", buffering=0)
        mark = file_mark(os.fstat(fd))
        size = mark[1]
        if size != entry.size:
            file.close()
            self._unpin(hex_)
            self._forget(hex_, "blob file has the wrong size", remove=True, inode=mark[0])
            return None
        verified = entry.verified_mark == mark
        if now - entry.last_touch >= self._touch_interval:
            # the mtime is the persistent last-access stamp (LRU order after a restart)
            entry.last_touch = now
            try:
                os.utime(fd, (now, now))
                mark = file_mark(os.fstat(fd))
                if verified:  # our own touch changes nothing in the content
                    entry.verified_mark = mark
            except OSError:
                pass
        self._load_sidecar(hex_, entry)
        info = BlobInfo(f"sha256:{hex_}", size, entry.content_type, now)
        return BlobReader(file, info, release=lambda: self._unpin(hex_), verified=verified, mark=mark)

    def _load_sidecar(self, hex_: str, entry: _Entry) -> None:
        if entry.sidecar_loaded:
            return
        try:
            document = json.loads(self._sidecar_path(hex_).read_bytes())
            content_type = document.get("content_type") if isinstance(document, dict) else None
        except (OSError, ValueError):
            content_type = None
        entry.content_type = _clean_content_type(content_type if isinstance(content_type, str) else None)
        entry.sidecar_loaded = True

    def verify(self, digest: object) -> bool:
        """Re-hash a committed blob; a corrupt one is removed. ``False`` if corrupt or absent."""
        reader = self.open_blob(digest)
        if reader is None:
            return False
        with reader:
            return self.verify_reader(reader)

    def verify_reader(self, reader: BlobReader) -> bool:
        """Hash the whole file of an open reader (without moving its position).

        True: the entry is remembered as verified for this file. False: the file is damaged and has
        been dropped (:meth:`drop_damaged`); the reader stays open but must not be served.
        """
        hasher = hashlib.sha256()
        fd = reader.file.fileno()
        offset = 0
        while chunk := os.pread(fd, VERIFY_CHUNK, offset):
            hasher.update(chunk)
            offset += len(chunk)
        if offset == reader.size and hasher.hexdigest() == digest_hex(reader.info.digest):
            self.mark_verified(reader)
            return True
        self.drop_damaged(reader, "blob content does not match its digest")
        return False

    def read_verified(self, reader: BlobReader, limit: int) -> bytes | None:
        """The whole content of a reader of at most ``limit`` bytes, hashed; None if it is damaged
        (then dropped) or longer than ``limit`` (for small documents such as manifests)."""
        if reader.size > limit:
            return None
        data = bytearray()
        fd = reader.file.fileno()
        while len(data) <= limit and (chunk := os.pread(fd, VERIFY_CHUNK, len(data))):
            data += chunk
        if len(data) > limit:
            return None
        if len(data) == reader.size and hashlib.sha256(data).hexdigest() == digest_hex(reader.info.digest):
            self.mark_verified(reader)
            return bytes(data)
        self.drop_damaged(reader, "blob content does not match its digest")
        return None

    def mark_verified(self, reader: BlobReader) -> None:
        """Remember that the reader's file matched its digest, if the cache still holds that file
        unchanged."""
        hex_ = digest_hex(reader.info.digest)
        try:
            mark = file_mark(os.fstat(reader.file.fileno()))
        except (OSError, ValueError):
            return
        if mark != reader.mark:
            return  # written to while it was hashed: what was hashed is not what is there now
        with self._lock:
            entry = self._index.get(hex_)
            if entry is not None and self._holds_locked(hex_, mark[0]):
                entry.verified_mark = mark
        reader.verified = True

    def drop_damaged(self, reader: BlobReader, reason: str) -> bool:
        """Remove the reader's blob from the cache, unless the cache has a new file for it meanwhile."""
        inode = reader.mark[0] if reader.mark is not None else os.fstat(reader.file.fileno()).st_ino
        reader.verified = False
        return self._forget(digest_hex(reader.info.digest), reason, remove=True, inode=inode)

    def _holds_locked(self, hex_: str, inode: int) -> bool:
        try:
            return (self._blobs_dir / hex_[:2] / hex_).lstat().st_ino == inode
        except OSError:
            return False

    # -- removal -----------------------------------------------------------------------------

    def delete(self, digest: object) -> bool:
        """Remove a blob (for example one found corrupt); ``False`` if it was not there."""
        return self._forget(digest_hex(digest), "deleted", remove=True)

    def _forget(self, hex_: str, reason: str, remove: bool = False, inode: int | None = None) -> bool:
        """Drop an entry (and with ``remove`` its files); with ``inode``, only if that is still its file."""
        with self._lock:
            if inode is not None and not self._holds_locked(hex_, inode):
                return False
            entry = self._index.pop(hex_, None)
            if entry is not None:
                self._total -= entry.size
            if remove:
                self._unlink_locked(hex_)
        if entry is not None:
            log.warning(
                "cache entry dropped", extra={"fields": {"digest": f"sha256:{hex_}", "reason": reason}}
            )
        return entry is not None

    def _unlink_locked(self, hex_: str) -> None:
        # blob first: a sidecar without its blob is an orphan that the next open removes
        try:
            (self._blobs_dir / hex_[:2] / hex_).unlink(missing_ok=True)
            self._sidecar_path(hex_).unlink(missing_ok=True)
        except OSError as exc:  # a read-only or failing disk: the entry is forgotten all the same
            log.warning("cannot remove a cached file", extra={"fields": {"digest": f"sha256:{hex_}",
                                                                         "reason": str(exc)}})

    def evict(self, target: int | None = None) -> list[str]:
        """Remove least recently used, unpinned blobs until the total is at most ``target``
        (default ``max_size``); returns the evicted digests."""
        with self._lock:
            return self._evict_locked(self.max_size if target is None else target)

    def _evict_locked(self, target: int) -> list[str]:
        evicted = self._evict_until_locked(lambda: self._total <= target)
        if evicted:
            log.info(
                "cache evicted blobs",
                extra={"fields": {"count": len(evicted), "bytes": self._total, "max_bytes": self.max_size}},
            )
        return evicted

    def _evict_until_locked(self, enough: Callable[[], bool]) -> list[str]:
        """Remove least recently used, unpinned blobs until ``enough()``; returns their digests."""
        evicted: list[str] = []
        for hex_ in list(self._index):
            if enough():
                break
            if self._pins.get(hex_):
                continue  # open for reading or being written: never pulled out from under a client
            entry = self._index.pop(hex_)
            self._total -= entry.size
            self._unlink_locked(hex_)
            evicted.append(f"sha256:{hex_}")
        self.evictions += len(evicted)
        return evicted

    # -- room --------------------------------------------------------------------------------

    def free_space(self) -> int:
        """Bytes an unprivileged writer may still use on the cache's filesystem."""
        info = os.statvfs(self._tmp_dir)
        return info.f_bavail * info.f_frsize

    def make_room(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes fits on the filesystem now, evicting least recently used
        blobs if that is enough to make it fit; False (nothing evicted) when it cannot fit."""
        needed = size + ROOM_MARGIN
        try:
            free = self.free_space()
        except OSError:
            return False
        if free >= needed:
            return True
        with self._lock:
            reclaimable = sum(entry.size for hex_, entry in self._index.items() if not self._pins.get(hex_))
            if free + reclaimable < needed:
                return False
            evicted = self._evict_until_locked(lambda: self.free_space() >= needed)
            free = self.free_space()
        log.info("cache evicted blobs to make room",
                 extra={"fields": {"count": len(evicted), "needed": needed, "free": free}})
        return free >= needed

    # -- writes ------------------------------------------------------------------------------

    def writer(
        self, digest: object, *, content_type: str | None = None, expected_size: int | None = None
    ) -> Writer:
        """Start writing the blob for ``digest``; commit it with :meth:`Writer.commit`.

        Raises :class:`StoreFull` at once if ``expected_size`` exceeds ``max_size`` or the free space
        of the filesystem (see :meth:`make_room`).
        """
        hex_ = digest_hex(digest)
        if expected_size is not None and expected_size > self.max_size:
            raise StoreFull(f"blob of {expected_size} bytes is larger than the cache ({self.max_size} bytes)")
        if expected_size is not None and not self.make_room(expected_size):
            raise StoreFull(f"no room for a blob of {expected_size} bytes on the cache's filesystem")
        with self._lock:
            self._pin(hex_)
        try:
            writer = Writer(self, hex_, _clean_content_type(content_type), expected_size, self.direct_writes)
        except BaseException:
            self._unpin(hex_)
            raise
        try:
            writer.room = self.free_space() - ROOM_MARGIN
        except OSError:
            writer.room = 0
        return writer

    def _commit(self, hex_: str, temp_path: Path, size: int, content_type: str | None) -> BlobInfo:
        shard = self._blobs_dir / hex_[:2]
        new_shard = not shard.exists()
        shard.mkdir(exist_ok=True)
        sidecar = json.dumps(
            {"digest": f"sha256:{hex_}", "size": size, "content_type": content_type}
        ).encode()
        fd, sidecar_temp = tempfile.mkstemp(prefix=hex_[:16] + ".", suffix=".meta.part", dir=self._tmp_dir)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(sidecar)
                file.flush()
                os.fsync(file.fileno())
            now = self._clock()
            os.utime(temp_path, (now, now))
            with self._lock:
                os.replace(sidecar_temp, self._sidecar_path(hex_))
                os.replace(temp_path, shard / hex_)
                previous = self._index.pop(hex_, None)
                if previous is not None:
                    self._total -= previous.size
                # hashed as it was written: this file is the verified content until it changes
                self._index[hex_] = _Entry(
                    size=size,
                    last_access=now,
                    content_type=content_type,
                    sidecar_loaded=True,
                    last_touch=now,
                    verified_mark=file_mark((shard / hex_).lstat()),
                )
                self._total += size
        except BaseException:
            Path(sidecar_temp).unlink(missing_ok=True)
            raise
        _fsync_dir(shard)
        if new_shard:
            _fsync_dir(self._blobs_dir)
        with self._lock:
            self._evict_locked(self.max_size)
        return BlobInfo(f"sha256:{hex_}", size, content_type, now)


def stage_block() -> mmap.mmap:
    """A writer's page-aligned block of :data:`STAGE_SIZE` bytes (as ``O_DIRECT`` needs), in one huge page
    where the kernel has transparent huge pages for those who ask and places the block where one fits (6.7
    on): the disk then gets a block as one piece of memory instead of 512 pages, each pinned and described
    to the device on its own. One 1 GiB blob written in 2 MiB blocks (bench/cache_write.py): about 5% less
    CPU and half again the write rate."""
    block = mmap.mmap(-1, STAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        block.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no such advice on this platform or kernel: ordinary pages
        pass
    return block


class Writer:
    """Writes one blob to a temp file, hashing as it goes; :meth:`commit` makes it visible.

    Use as a context manager to abort on any exception. After :class:`DigestMismatch` or any other
    error from :meth:`write` / :meth:`commit`, the writer has already aborted itself and nothing is kept.

    A disk that fails under a write (full, read-only, I/O error) or a blob that outgrows the cache
    does not end the writer: it records the error in :attr:`failure`, removes its temp file (readers
    that opened it keep its first :attr:`bytes_in_file` bytes) and goes on hashing what it is given,
    so that :meth:`verify` still tells whether the body was right. Such a writer is never committed:
    :meth:`commit` raises :class:`StoreFull` (or the disk's error).

    Bytes are staged in a page-aligned buffer and reach the file in blocks of :data:`STAGE_SIZE`
    (the rest at :meth:`flush`). A full block is hashed, then written on a thread of its own while the
    next block is staged and hashed in the other of two buffers; :meth:`write` waits for the previous
    block's write before it hands over the next, so one block at most is in flight, in order, and a
    failed write is seen at the next block (or at :meth:`flush`). With ``direct`` the blocks are
    written with ``O_DIRECT``: a fill does not allocate and dirty page-cache pages for bytes nobody
    reads back soon, which costs more CPU than the rest of the write path on some machines; a
    filesystem that refuses it falls back to ordinary writes. While the fill goes on, other threads
    may open :attr:`temp_path` read-only and serve its first :attr:`bytes_in_file` bytes; a file
    opened before the commit or abort stays readable afterwards (rename / unlink keep the inode).
    Those bytes are unverified until :meth:`verify` or :meth:`commit` returns.
    """

    def __init__(self, store: Store, hex_: str, content_type: str | None, expected_size: int | None,
                 direct: bool = False):
        self.digest = f"sha256:{hex_}"
        self.content_type = content_type
        self.expected_size = expected_size
        #: Bytes accepted so far (staged or in the file).
        self.bytes_written = 0
        #: Bytes in the temp file, readable by other threads.
        self.bytes_in_file = 0
        self._store = store
        self._hex = hex_
        self._hasher = hashlib.sha256()
        fd, temp = tempfile.mkstemp(prefix=hex_[:16] + ".", suffix=".part", dir=store._tmp_dir)
        self.temp_path = Path(temp)
        self._fd: int | None = fd
        self.direct = direct and _set_direct(fd, True)
        self._stage: mmap.mmap | None = None
        self._spare: mmap.mmap | None = None  # the other buffer: being written, or free
        self._in_flight: tuple[Future, int] | None = None  # the write of the spare buffer and its size
        self._staged = 0
        self._done = False
        #: Why the bytes stopped going to the file (then they are only hashed), or None.
        self.failure: OSError | StoreError | None = None
        #: Bytes the filesystem had room for when the writer was created (see :meth:`Store.make_room`).
        self.room: int | None = None

    def describe(self, content_type: str | None, expected_size: int | None) -> None:
        """Set what a writer created before its response arrived could not know (no I/O: any thread)."""
        self.content_type = _clean_content_type(content_type)
        self.expected_size = expected_size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; raises :class:`StoreFull` on a full disk, :class:`SizeMismatch` past
        ``expected_size`` (the writer is then aborted)."""
        if self._done:
            raise StoreError("writer already committed or aborted")
        with memoryview(data) as raw, raw.cast("B") as view:
            new_size = self.bytes_written + len(view)
            if self.expected_size is not None and new_size > self.expected_size:
                self.abort()
                raise SizeMismatch(self.digest, self.expected_size, new_size)
            if new_size > self._store.max_size and self.failure is None:
                if self._staged:  # staged bytes are hashed when they go to the file: they never will now
                    with memoryview(cast(mmap.mmap, self._stage)) as whole, whole[:self._staged] as staged:
                        self._hasher.update(staged)
                self._give_up(StoreFull(f"blob is larger than the cache ({self._store.max_size} bytes)"))
            if self.failure is not None:
                self._hasher.update(view)
                self.bytes_written = new_size
                return
            if self._stage is None:
                self._stage, self._spare = stage_block(), stage_block()
            taken = 0
            while taken < len(view):
                size = min(STAGE_SIZE - self._staged, len(view) - taken)
                self._stage[self._staged:self._staged + size] = view[taken:taken + size]
                self._staged += size
                taken += size
                if self._staged == STAGE_SIZE:
                    self._write_stage()
                    if self.failure is not None:  # the staged bytes were hashed: only the rest is left
                        self._hasher.update(view[taken:])
                        break
        self.bytes_written = new_size

    def flush(self) -> None:
        """Write what is staged, so that the file holds every accepted byte."""
        if self._done:
            raise StoreError("writer already committed or aborted")
        if self._staged and self.failure is None:
            self._write_stage()
        self._land()

    def _write_stage(self) -> None:
        with memoryview(cast(mmap.mmap, self._stage)) as whole, whole[:self._staged] as staged:
            self._hasher.update(staged)
        self._land()  # the previous block is in the file: its buffer is free, the file's offset is right
        if self.failure is not None:
            return
        if self.direct and self._staged % DIRECT_ALIGNMENT:
            self._buffered("an unaligned last block")
        block, size = cast(mmap.mmap, self._stage), self._staged
        self._stage, self._spare = self._spare, block
        self._staged = 0
        self._in_flight = (_FILE_WRITES.submit(self._write_block, block, size), size)

    def _write_block(self, block: mmap.mmap, size: int) -> None:
        """One block to the file (on a write thread)."""
        try:
            with memoryview(block) as whole, whole[:size] as view:
                self._write_all(view)
        except OSError as error:
            raise error.with_traceback(None) from None  # its frames would keep views of the block alive

    def _land(self) -> None:
        """Wait for the block in flight; its bytes are then in the file, or the writer has given up."""
        if self._in_flight is None:
            return
        future, size = self._in_flight
        self._in_flight = None
        try:
            future.result()
        except OSError as failure:
            self._give_up(StoreFull(f"no space left while caching {self.digest}: {failure.strerror}")
                          if failure.errno in _NO_SPACE else failure)
            return
        self.bytes_in_file += size

    def _give_up(self, failure: OSError | StoreError) -> None:
        """Stop writing for good (the disk failed or the blob outgrew the cache); keep hashing.

        Whatever was staged must already be in the hash."""
        self.failure = failure
        self._staged = 0
        log.warning("cache write failed; the blob goes on uncached",
                    extra={"fields": {"digest": self.digest, "reason": str(failure)}})
        try:
            self._close_file()
        except OSError:
            pass
        # readers that opened the file keep it; the space it held is given back now
        with contextlib.suppress(OSError):
            self.temp_path.unlink(missing_ok=True)

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                written = os.write(cast(int, self._fd), view[done:])
            except OSError as error:
                if not (self.direct and error.errno == errno.EINVAL):
                    raise
                # the filesystem or device wants another alignment: ordinary writes from here on
                self._buffered(f"O_DIRECT refused ({error.strerror})")
                continue
            done += written
            if self.direct and done < len(view) and done % DIRECT_ALIGNMENT:
                self._buffered("a short write")

    def _buffered(self, why: str) -> None:
        self.direct = False
        _set_direct(cast(int, self._fd), False)
        log.debug("cache writes without O_DIRECT: %s", why)

    def verify(self, rest: Sequence[bytes | bytearray | memoryview] = ()) -> None:
        """Check that the accepted bytes followed by ``rest`` (not accepted yet: the caller writes them
        next) are the blob, without touching the file.

        Raises :class:`DigestMismatch` (and aborts: nothing kept) or :class:`SizeMismatch`. Cheap: the
        hash was computed while writing. Lets a caller release verified bytes to clients from memory
        without waiting for the last block to land or for :meth:`commit`'s fsync, either of which may
        queue behind another file's flush on the same disk.
        """
        if self._done:
            raise StoreError("writer already committed or aborted")
        hasher = self._hasher.copy()
        if self._staged:  # staged bytes are hashed when they go to the file
            with memoryview(cast(mmap.mmap, self._stage)) as whole, whole[:self._staged] as staged:
                hasher.update(staged)
        size = self.bytes_written
        for chunk in rest:
            hasher.update(chunk)
            size += len(chunk)
        try:
            self._check(hasher, size)
        except DigestMismatch:
            self.abort()
            raise

    def _check(self, hasher: _Hash, size: int) -> None:
        """Raise :class:`DigestMismatch` / :class:`SizeMismatch` unless ``size`` bytes hashed into
        ``hasher`` are the blob."""
        actual = hasher.hexdigest()
        if actual != self._hex:
            raise DigestMismatch(self.digest, f"sha256:{actual}", size)
        if self.expected_size is not None and size != self.expected_size:
            raise SizeMismatch(self.digest, self.expected_size, size)

    def commit(self) -> BlobInfo:
        """Flush, fsync, check the digest (and size), rename into place, fsync the directory, evict.

        Raises :class:`DigestMismatch` / :class:`SizeMismatch` (nothing kept) or
        :class:`StoreFull`. Committing a digest that is already cached replaces it.
        """
        self.flush()
        if self.failure is not None:
            failure = self.failure
            self.abort()
            raise failure
        try:
            os.fsync(cast(int, self._fd))
            self._close_file()
            self._check(self._hasher, self.bytes_written)
            info = self._store._commit(self._hex, self.temp_path, self.bytes_written, self.content_type)
        except OSError as error:
            self.abort()
            if error.errno in _NO_SPACE:
                raise StoreFull(f"no space left while caching {self.digest}: {error.strerror}") from error
            raise
        except BaseException:
            self.abort()
            raise
        self._finish()
        return info

    def abort(self) -> None:
        """Drop the temp file; safe to call more than once and after a failed commit."""
        if self._done:
            return
        try:
            self._close_file()
        except OSError:
            pass
        self.temp_path.unlink(missing_ok=True)
        self._finish()

    def _close_file(self) -> None:
        if self._in_flight is not None:  # a block still being written must not find its descriptor closed
            with contextlib.suppress(OSError):
                self._in_flight[0].result()
            self._in_flight = None
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _finish(self) -> None:
        self._done = True
        for buffer in (self._stage, self._spare):
            if buffer is not None:
                with contextlib.suppress(BufferError):  # a view still held elsewhere: the GC closes it
                    buffer.close()
        self._stage = self._spare = None
        self._store._unpin(self._hex)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


def _set_direct(fd: int, on: bool) -> bool:
    """Switch ``O_DIRECT`` on ``fd``; False where the filesystem does not support it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return True


class ContainerdContentSource:
    """Read-only lookup of blobs in containerd's content store (``<dir>/blobs/sha256/<hex>``).

    Nothing is pinned or written; the caller verifies the bytes against the digest like any
    other source, since containerd's files are outside our control.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    def open_blob(self, digest: object) -> BlobReader | None:
        """Open the blob for ``digest`` if containerd has it, else ``None``."""
        hex_ = digest_hex(digest)
        try:
            fd = os.open(self.directory / "blobs" / "sha256" / hex_, _OPEN_FLAGS)
        except OSError:
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        file = os.fdopen(fd, "rb", buffering=0)
        return BlobReader(file, BlobInfo(f"sha256:{hex_}", info.st_size, None, info.st_mtime))
