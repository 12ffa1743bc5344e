import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnsmirror.oci import Digest
from dnsmirror.store import (
    ROOM_MARGIN,
    STAGE_SIZE,
    ContainerdContentSource,
    DigestMismatch,
    InvalidDigest,
    SizeMismatch,
    Store,
    StoreFull,
    StoreLocked,
    digest_hex,
    stage_block,
)

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


def open_store(root, max_size=10 * MiB, clock=None):
    return Store.open(root, max_size, clock=clock or Clock(), touch_interval=0)


def put(store, data: bytes, content_type=None):
    with store.writer(sha(data), content_type=content_type, expected_size=len(data)) as writer:
        writer.write(data[: len(data) // 2])
        writer.write(data[len(data) // 2 :])
        return writer.commit()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# --- commit / abort / mismatch -----------------------------------------------------------------


def test_commit_then_read(root):
    with open_store(root) as store:
        data = os.urandom(100_000)
        info = put(store, data, content_type="application/vnd.oci.image.manifest.v1+json")
        assert info.digest == sha(data) and info.size == len(data)
        hex_ = digest_hex(sha(data))
        assert (root / "blobs" / "sha256" / hex_[:2] / hex_).read_bytes() == data
        sidecar = json.loads((root / "blobs" / "sha256" / hex_[:2] / (hex_ + ".meta")).read_bytes())
        assert sidecar == {"digest": sha(data), "size": len(data), "content_type": info.content_type}
        with store.open_blob(sha(data)) as reader:
            assert reader.size == len(data)
            assert reader.info.content_type == "application/vnd.oci.image.manifest.v1+json"
            reader.seek(10)
            assert reader.read(5) == data[10:15]
            assert reader.read() == data[15:]
        assert store.total_size == len(data) and store.blob_count == 1
        assert sha(data) in store
        assert os.listdir(root / "tmp") == []


def test_accepts_oci_digest_objects(root):
    with open_store(root) as store:
        data = b"manifest"
        put(store, data)
        assert store.stat(Digest.of(data)).size == len(data)


def test_absent_blob(root):
    with open_store(root) as store:
        assert store.open_blob(sha(b"nothing")) is None
        assert store.stat(sha(b"nothing")) is None


def test_abort_keeps_nothing(root):
    with open_store(root) as store:
        writer = store.writer(sha(b"abc"))
        writer.write(b"ab")
        assert writer.temp_path.exists()
        writer.abort()
        writer.abort()
        assert not writer.temp_path.exists()
        assert store.open_blob(sha(b"abc")) is None
        assert store.pinned(sha(b"abc")) == 0
        assert files_under(root / "blobs") == [] and os.listdir(root / "tmp") == []


def test_exception_inside_writer_context_aborts(root):
    with open_store(root) as store:
        with pytest.raises(RuntimeError), store.writer(sha(b"abc")) as writer:
            writer.write(b"a")
            raise RuntimeError("client went away")
        assert os.listdir(root / "tmp") == [] and store.pinned(sha(b"abc")) == 0


def test_digest_mismatch_keeps_nothing(root):
    with open_store(root) as store:
        writer = store.writer(sha(b"expected"))
        writer.write(b"something else")
        with pytest.raises(DigestMismatch) as caught:
            writer.commit()
        assert caught.value.expected == sha(b"expected")
        assert caught.value.actual == sha(b"something else")
        assert store.open_blob(sha(b"expected")) is None
        assert files_under(root / "blobs") == [] and os.listdir(root / "tmp") == []
        assert store.total_size == 0 and store.pinned(sha(b"expected")) == 0


def test_size_mismatch_short_and_long(root):
    with open_store(root) as store:
        data = b"0123456789"
        writer = store.writer(sha(data), expected_size=len(data))
        with pytest.raises(SizeMismatch):
            writer.write(data + b"x")
        assert os.listdir(root / "tmp") == []
        # the right bytes but the wrong announced size are not kept either
        writer = store.writer(sha(data), expected_size=len(data) + 1)
        writer.write(data)
        with pytest.raises(SizeMismatch):
            writer.commit()
        assert store.open_blob(sha(data)) is None and os.listdir(root / "tmp") == []


def test_writer_unusable_after_commit(root):
    with open_store(root) as store:
        writer = store.writer(sha(b"x"))
        writer.write(b"x")
        writer.commit()
        with pytest.raises(Exception, match="already"):
            writer.write(b"y")
        with pytest.raises(Exception, match="already"):
            writer.commit()


def test_recommit_same_digest_counts_once(root):
    with open_store(root) as store:
        put(store, b"same")
        put(store, b"same")
        assert store.total_size == 4 and store.blob_count == 1


def test_concurrent_writers_of_one_digest(root):
    data = os.urandom(300_000)
    errors = []
    with open_store(root) as store:

        def fill():
            try:
                put(store, data)
            except Exception as error:  # noqa: BLE001 - reported below  # pragma: no cover
                errors.append(error)

        threads = [threading.Thread(target=fill) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == []
        assert store.total_size == len(data) and store.blob_count == 1
        assert store.verify(sha(data))
        assert os.listdir(root / "tmp") == []


def test_content_type_is_sanitised(root):
    with open_store(root) as store:
        info = put(store, b"a", content_type="text/plain\r\nSet-Cookie: x")
        assert info.content_type is None
        assert (
            put(store, b"b", content_type="application/octet-stream").content_type
            == "application/octet-stream"
        )


# --- crash recovery ----------------------------------------------------------------------------


def test_leftover_temp_files_removed_at_open(root):
    store = open_store(root)
    put(store, b"kept")
    writer = store.writer(sha(b"partial"))
    writer.write(b"part")
    # the process "crashes": the writer is never committed or aborted
    store.close()
    (root / "tmp" / "stray-dir").mkdir()
    (root / "tmp" / "stray-dir" / "f").write_bytes(b"x")
    assert os.listdir(root / "tmp")
    with open_store(root) as reopened:
        assert os.listdir(root / "tmp") == []
        assert reopened.open_blob(sha(b"partial")) is None
        assert reopened.stat(sha(b"kept")).size == 4
    writer._close_file()  # the "crashed" writer still holds its descriptor


def test_orphan_sidecar_removed_and_blob_without_sidecar_kept(root):
    with open_store(root) as store:
        put(store, b"one")
        put(store, b"two")
    one, two = digest_hex(sha(b"one")), digest_hex(sha(b"two"))
    # a crash between the two renames leaves a sidecar alone; a lost sidecar leaves a bare blob
    (root / "blobs/sha256" / one[:2] / one).unlink()
    (root / "blobs/sha256" / two[:2] / (two + ".meta")).unlink()
    with open_store(root) as store:
        assert not (root / "blobs/sha256" / one[:2] / (one + ".meta")).exists()
        assert store.stat(sha(b"one")) is None
        info = store.stat(sha(b"two"))
        assert info.size == 3 and info.content_type is None
        assert store.total_size == 3


def test_partial_file_never_visible_at_final_path(root):
    data = os.urandom(MiB)
    with open_store(root) as store:
        final = store.blob_path(sha(data))
        writer = store.writer(sha(data))
        for offset in range(0, len(data), 64 * 1024):
            writer.write(data[offset : offset + 64 * 1024])
            assert not final.exists()
            assert store.open_blob(sha(data)) is None
        writer.commit()
        assert final.read_bytes() == data


def test_wrong_size_on_disk_is_dropped(root):
    with open_store(root) as store:
        put(store, b"hello world")
        path = store.blob_path(sha(b"hello world"))
        path.write_bytes(b"hello")  # damaged behind our back
        assert store.open_blob(sha(b"hello world")) is None
        assert not path.exists() and store.total_size == 0


def test_verify_removes_corrupt_blob(root):
    with open_store(root) as store:
        put(store, b"hello world")
        assert store.verify(sha(b"hello world"))
        store.blob_path(sha(b"hello world")).write_bytes(b"HELLO WORLD")
        assert not store.verify(sha(b"hello world"))
        assert store.stat(sha(b"hello world")) is None
        assert not store.verify(sha(b"absent"))


def test_second_open_of_same_dir_is_refused(root):
    with open_store(root):
        with pytest.raises(StoreLocked):
            open_store(root)
    open_store(root).close()


# --- size accounting and eviction --------------------------------------------------------------


def blob(n: int, size: int = 1000) -> bytes:
    return bytes([n]) * size


def test_lru_eviction_order(root):
    with open_store(root, max_size=3000) as store:
        for n in range(3):
            put(store, blob(n))
        # reading blob 0 makes blob 1 the least recently used
        store.open_blob(sha(blob(0))).close()
        put(store, blob(3))
        assert store.stat(sha(blob(1))) is None
        assert {n for n in range(4) if store.stat(sha(blob(n)))} == {0, 2, 3}
        assert not store.blob_path(sha(blob(1))).exists()
        assert store.total_size == 3000 and store.evictions == 1
        # stat is not an access: blob 2 is now the oldest
        store.stat(sha(blob(0)))
        put(store, blob(4))
        assert {n for n in range(5) if store.stat(sha(blob(n)))} == {0, 3, 4}


def test_eviction_skips_open_readers(root):
    with open_store(root, max_size=2000) as store:
        put(store, blob(0))
        put(store, blob(1))
        reader = store.open_blob(sha(blob(0)))
        store.open_blob(sha(blob(1))).close()  # blob 0 is now LRU, but it is open
        put(store, blob(2))
        assert store.stat(sha(blob(0))) is not None and store.stat(sha(blob(1))) is None
        assert reader.read() == blob(0)
        reader.close()
        reader.close()
        assert store.pinned(sha(blob(0))) == 0
        put(store, blob(3))
        assert store.stat(sha(blob(0))) is None


def test_eviction_skips_blob_being_written_and_everything_pinned(root):
    with open_store(root, max_size=2000) as store:
        put(store, blob(0))
        put(store, blob(1))
        rewrite = store.writer(sha(blob(0)))  # blob 0 is being written again: pinned
        held = store.open_blob(sha(blob(1)))
        put(store, blob(2))
        # nothing evictable: over the limit for now rather than yank a blob from a client
        assert store.total_size == 3000 and store.evictions == 0
        rewrite.abort()
        held.close()
        assert store.evict() == [sha(blob(0))]
        assert store.total_size == 2000


def test_blob_larger_than_cache_is_refused(root):
    with open_store(root, max_size=1000) as store:
        with pytest.raises(StoreFull):
            store.writer(sha(blob(0, 1001)), expected_size=1001)
        writer = store.writer(sha(blob(0, 1001)))  # size unknown up front
        writer.write(blob(0, 600))
        writer.write(blob(0, 1001)[600:])  # outgrows the cache: no longer written, still hashed
        assert isinstance(writer.failure, StoreFull) and os.listdir(root / "tmp") == []
        writer.verify()  # the body was right, so its readers may have it all
        with pytest.raises(StoreFull):
            writer.commit()
        assert store.pinned(sha(blob(0, 1001))) == 0 and store.blob_count == 0


def test_accounting_and_lru_order_survive_restart(root):
    clock = Clock()
    with open_store(root, max_size=10_000, clock=clock) as store:
        for n in range(4):
            put(store, blob(n))
        store.open_blob(sha(blob(0))).close()  # touches blob 0's mtime
    # a smaller limit on restart: the scan evicts the least recently used at once
    with open_store(root, max_size=2500, clock=clock) as store:
        assert store.blob_count == 2 and store.total_size == 2000
        assert {n for n in range(4) if store.stat(sha(blob(n)))} == {0, 3}
    with open_store(root, max_size=10_000, clock=clock) as store:
        assert store.total_size == 2000
        put(store, blob(5, 500))
        assert store.total_size == 2500


def test_unrelated_files_ignored_by_scan(root):
    with open_store(root) as store:
        put(store, b"x")
    (root / "blobs/sha256/zz").mkdir()
    (root / "blobs/sha256/zz/notes").write_bytes(b"12345")
    (root / "blobs/sha256/README").write_bytes(b"hi")
    with open_store(root) as store:
        assert store.total_size == 1 and store.blob_count == 1


# --- disk full ---------------------------------------------------------------------------------


def full_disk(monkeypatch, writer, room: int) -> None:
    """Make ``writer``'s file fail the way a full file system does once ``room`` bytes are written."""
    real_write = os.write
    left = [room]

    def write(fd, data):
        if fd == writer._fd:
            if len(data) > left[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            left[0] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_enospc_during_write_stops_caching_but_not_hashing(root, monkeypatch):
    size = STAGE_SIZE + 5000
    with open_store(root, max_size=4 * STAGE_SIZE) as store:
        writer = store.writer(sha(blob(1, size)))
        full_disk(monkeypatch, writer, room=STAGE_SIZE + 3000)
        writer.write(blob(1, STAGE_SIZE))  # one whole block goes to the file, on a write thread
        writer.flush()  # and has landed: every accepted byte is in the file
        assert writer.bytes_in_file == STAGE_SIZE
        writer.write(blob(1, size)[STAGE_SIZE:])  # staged only: the disk is not touched yet
        writer.verify()  # the digest matches; the file is not touched
        assert writer.failure is None and writer.bytes_in_file == STAGE_SIZE
        writer.flush()  # the flush of the last 5000 bytes finds the disk full
        assert isinstance(writer.failure, StoreFull) and writer.bytes_in_file == STAGE_SIZE
        assert os.listdir(root / "tmp") == []  # the space is given back at once
        with pytest.raises(StoreFull):
            writer.commit()
        assert store.pinned(sha(blob(1, size))) == 0 and store.total_size == 0


def test_a_write_failing_mid_block_still_hashes_every_byte(root, monkeypatch):
    data = blob(3, 3 * STAGE_SIZE + 10)
    with open_store(root, max_size=8 * STAGE_SIZE) as store:
        writer = store.writer(sha(data))
        full_disk(monkeypatch, writer, room=STAGE_SIZE // 2)
        writer.write(data)  # the first block fails; the rest of this very call is hashed only
        assert writer.failure is not None and writer.bytes_in_file == 0
        writer.verify()
        wrong = store.writer(sha(data))
        full_disk(monkeypatch, wrong, room=0)
        wrong.write(data[:-1] + b"!")
        with pytest.raises(DigestMismatch):
            wrong.verify()


def test_a_read_only_or_failing_disk_stops_caching_with_its_own_error(root, monkeypatch):
    data = blob(4, STAGE_SIZE + 1)
    with open_store(root, max_size=8 * STAGE_SIZE) as store:
        writer = store.writer(sha(data))
        real_write = os.write

        def write(fd, chunk):
            if fd == writer._fd:
                raise OSError(errno.EIO, "Input/output error")
            return real_write(fd, chunk)

        monkeypatch.setattr(os, "write", write)
        writer.write(data)
        writer.verify()
        with pytest.raises(OSError) as raised:
            writer.commit()
        assert raised.value.errno == errno.EIO and store.blob_count == 0


def test_make_room_compares_free_space_and_evicts_only_if_that_is_enough(root, monkeypatch):
    with open_store(root, max_size=10_000) as store:
        put(store, blob(0))
        put(store, blob(1))
        free = [ROOM_MARGIN + 500]
        monkeypatch.setattr(store, "free_space", lambda: free[0])
        assert store.make_room(500) and store.blob_count == 2
        # 2000 bytes of blobs cannot make room for 5000: nothing is evicted for nothing
        assert not store.make_room(5000) and store.blob_count == 2
        with pytest.raises(StoreFull):
            store.writer(sha(blob(9, 5000)), expected_size=5000)

        def evict_frees(*args):
            free[0] += 1000
            return real_unlink(*args)

        real_unlink = store._unlink_locked
        monkeypatch.setattr(store, "_unlink_locked", evict_frees)
        assert store.make_room(1200)  # the least recently used blob goes, and that is enough
        assert store.blob_count == 1 and store.stat(sha(blob(0))) is None


def run_on_a_small_tmpfs(mountpoint: Path, script: str) -> dict:
    """Run ``script`` (Python printing one JSON object) with a 1 MiB tmpfs on ``mountpoint``, mounted in a
    private mount namespace that vanishes with the child; skips where mounting is not permitted."""
    command = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$1" -c "$2"',
        str(mountpoint),
        sys.executable,
        script,
    ]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                   cwd=Path(__file__).resolve().parent.parent)
    except OSError as error:  # pragma: no cover
        pytest.skip(f"cannot run unshare: {error}")
    if completed.returncode != 0 and "mount" in completed.stderr and "dnsmirror" not in completed.stderr:
        pytest.skip(f"tmpfs mount not permitted here: {completed.stderr.strip()}")
    assert completed.returncode == 0, completed.stderr
    # the tmpfs lived only in the child's namespace
    assert os.listdir(mountpoint) == []
    return json.loads(completed.stdout)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for a tmpfs"
)
def test_enospc_on_a_real_full_tmpfs(tmp_path):
    # a 1 MiB tmpfs in a private mount namespace: it vanishes with the child process
    mountpoint = tmp_path / f"full-{uuid.uuid4().hex[:8]}"
    mountpoint.mkdir()
    script = textwrap.dedent(
        f"""
        import hashlib, json, os, sys
        from dnsmirror.store import Store, StoreFull
        data = os.urandom(3 * 1024 * 1024)
        small = b"fits"
        result = {{}}
        with Store.open({str(mountpoint)!r}, 100 * 1024 * 1024) as store:
            writer = store.writer("sha256:" + hashlib.sha256(data).hexdigest())
            for i in range(0, len(data), 65536):
                writer.write(data[i:i + 65536])
            writer.verify()
            try:
                writer.commit()
                result["full"] = False
            except StoreFull:
                result["full"] = True
            result["tmp"] = os.listdir({str(mountpoint / "tmp")!r})
            with store.writer("sha256:" + hashlib.sha256(small).hexdigest()) as writer:
                writer.write(small)
                result["small"] = writer.commit().size
        print(json.dumps(result))
        """
    )
    assert run_on_a_small_tmpfs(mountpoint, script) == {"full": True, "tmp": [], "small": 4}


# --- path safety -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "sha256:",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha512:" + "a" * 128,
        "sha256:../../../../etc/passwd",
        "sha256:" + "a" * 62 + "/a",
        "sha256:" + "a" * 64 + "\n",
        " sha256:" + "a" * 64,
        "../" + "a" * 64,
        "a" * 64,
        None,
    ],
)
def test_invalid_digests_rejected_everywhere(root, digest):
    with open_store(root) as store:
        for call in (store.open_blob, store.stat, store.writer, store.blob_path, store.delete, store.verify):
            with pytest.raises(InvalidDigest):
                call(digest)
        with pytest.raises(InvalidDigest):
            ContainerdContentSource(root).open_blob(digest)
        with pytest.raises(ValueError):
            digest_hex(digest)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=120), st.text(alphabet="sha256:0123456789abcdef./", max_size=80)))
def test_no_string_names_a_path_outside_the_blob_tree(tmp_path, text):
    store_root = (tmp_path / "hyp").resolve()
    store = Store.__new__(Store)
    store._blobs_dir = store_root / "blobs" / "sha256"
    try:
        path = store.blob_path(text)
    except InvalidDigest:
        return
    resolved = path.resolve()
    assert resolved.parent.parent == store_root / "blobs" / "sha256"
    assert resolved.name == text.split(":", 1)[1]


# --- containerd content ------------------------------------------------------------------------


def test_containerd_content_source(tmp_path):
    content = tmp_path / "io.containerd.content.v1.content"
    (content / "blobs" / "sha256").mkdir(parents=True)
    data = b"layer bytes"
    (content / "blobs" / "sha256" / digest_hex(sha(data))).write_bytes(data)
    source = ContainerdContentSource(content)
    with source.open_blob(sha(data)) as reader:
        assert reader.size == len(data) and reader.read() == data
        assert reader.info.digest == sha(data)
    assert source.open_blob(sha(b"other")) is None
    # a symlink or a directory in place of a blob is not served
    (content / "blobs" / "sha256" / digest_hex(sha(b"dir"))).mkdir()
    assert source.open_blob(sha(b"dir")) is None
    os.symlink("/etc/hostname", content / "blobs" / "sha256" / digest_hex(sha(b"link")))
    assert source.open_blob(sha(b"link")) is None
    assert ContainerdContentSource(tmp_path / "missing").open_blob(sha(data)) is None


def test_temp_file_readable_while_filling_and_after_commit(root):
    data = os.urandom(2 * STAGE_SIZE + 200_000)
    with open_store(root, max_size=8 * STAGE_SIZE) as store:
        writer = store.writer(sha(data))
        writer.write(data[:50_000])
        assert (writer.bytes_written, writer.bytes_in_file) == (50_000, 0)  # staged, not yet in the file
        with open(writer.temp_path, "rb") as partial:
            writer.write(data[50_000:STAGE_SIZE + 60_000])
            # a whole block goes to the file as it fills; it counts once its write has landed
            assert writer.bytes_in_file in (0, STAGE_SIZE)
            writer.write(data[STAGE_SIZE + 60_000:2 * STAGE_SIZE + 1])  # the next block waits for it
            assert writer.bytes_in_file >= STAGE_SIZE
            assert partial.read(STAGE_SIZE) == data[:STAGE_SIZE]
            writer.write(data[2 * STAGE_SIZE + 1:])
            writer.flush()
            assert writer.bytes_in_file == len(data)
            assert partial.read() == data[STAGE_SIZE:]
            writer.commit()
        assert not writer.temp_path.exists()
        with store.open_blob(sha(data)) as reader:
            assert reader.read() == data


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(
    "sizes", [[1], [4095, 1], [STAGE_SIZE], [STAGE_SIZE - 1, 2, 4096], [3 * STAGE_SIZE + 17]]
)
def test_direct_and_buffered_writes_keep_every_byte(root, direct, sizes):
    pieces = [os.urandom(size) for size in sizes]
    data = b"".join(pieces)
    with Store.open(root, 8 * STAGE_SIZE, touch_interval=0, direct_writes=direct) as store:
        writer = store.writer(sha(data), expected_size=len(data))
        for piece in pieces:
            writer.write(piece)
        writer.verify()
        info = writer.commit()
        assert info.size == len(data)
        with store.open_blob(sha(data)) as reader:
            assert reader.read() == data


def test_direct_writes_fall_back_when_the_filesystem_refuses(root, monkeypatch):
    data = os.urandom(2 * STAGE_SIZE)
    real_write = os.write
    refused = []

    def picky_write(fd, payload):
        # a device that wants a larger alignment than ours refuses O_DIRECT writes with EINVAL
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(payload))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, payload)

    with Store.open(root, 8 * STAGE_SIZE, touch_interval=0, direct_writes=True) as store:
        writer = store.writer(sha(data))
        monkeypatch.setattr(os, "write", picky_write)
        assert writer.direct
        writer.write(data)
        assert refused and not writer.direct
        writer.commit()
        monkeypatch.undo()
        with store.open_blob(sha(data)) as reader:
            assert reader.read() == data


def _huge_pages_on_request() -> bool:
    """Whether this kernel gives transparent huge pages to memory that asks for them."""
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in setting


def _mapping_fields(address: int) -> dict[str, str]:
    """The fields of this process's memory mapping that holds ``address`` (/proc/self/smaps), with its
    permissions under "perms"."""
    fields: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and ":" not in head[0]:  # a mapping's first line: "start-end perms offset ..."
            if fields is not None:
                break
            start, end = (int(bound, 16) for bound in head[0].split("-"))
            if start <= address < end:
                fields = {"perms": head[1]}
        elif fields is not None and head[0].endswith(":"):
            fields[head[0][:-1]] = head[1] if len(head) > 1 else ""
    assert fields is not None, f"no mapping holds {address:#x}"
    return fields


@pytest.mark.skipif(not _huge_pages_on_request(), reason="this kernel gives no transparent huge pages")
def test_a_writers_blocks_ask_for_huge_pages():
    block = stage_block()
    view = ctypes.c_char.from_buffer(block)
    try:
        address = ctypes.addressof(view)
        fields = _mapping_fields(address)
    finally:
        del view
        block.close()
    # private memory the kernel may back with huge pages (a shared mapping would be shmem, which it does not)
    assert fields["perms"].endswith("p")
    huge = int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    if STAGE_SIZE < huge or address % huge:
        # a block smaller than a huge page (64 KiB base pages), or placed anywhere (kernels before 6.7 do not
        # align anonymous mappings): no huge page fits it, whatever it asks
        pytest.skip(f"a {STAGE_SIZE}-byte block at {address:#x} cannot hold a {huge}-byte huge page here")
    assert fields["THPeligible"] == "1"


def test_a_mismatch_is_found_whatever_was_still_staged(root):
    data = os.urandom(STAGE_SIZE + 10)
    with open_store(root, max_size=8 * STAGE_SIZE) as store:
        writer = store.writer(sha(data))
        writer.write(data[:-1] + b"X")
        with pytest.raises(DigestMismatch):
            writer.verify()
        assert os.listdir(root / "tmp") == []


def test_modules_do_not_import_twisted():
    code = (
        "import sys, dnsmirror.store, dnsmirror.oci; "
        "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted') != [])"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr


def test_verify_checks_the_digest_before_the_durable_commit(tmp_path):
    data = b"verified bytes"
    with Store.open(tmp_path / "cache", 2**20) as store:
        good = store.writer(sha(data), expected_size=len(data))
        good.write(data)
        good.verify()
        assert sha(data) not in store  # verified, not yet committed
        good.commit()
        assert sha(data) in store
        bad = store.writer(sha(b"other"), expected_size=len(data))
        bad.write(data)
        with pytest.raises(DigestMismatch):
            bad.verify()
        assert not bad.temp_path.exists() and sha(b"other") not in store


def test_verify_checks_bytes_still_to_be_written_without_touching_the_file(root, monkeypatch):
    data = blob(5, 2 * STAGE_SIZE + 777)
    cut = STAGE_SIZE + 100  # in the file; then a few bytes staged, the rest not accepted yet
    with open_store(root, max_size=8 * STAGE_SIZE) as store:
        writer = store.writer(sha(data), expected_size=len(data))
        writer.write(data[:cut])
        writer.flush()
        monkeypatch.setattr(os, "write", lambda *_: pytest.fail("verify wrote to the file"))
        monkeypatch.setattr(os, "fsync", lambda *_: pytest.fail("verify flushed the file"))
        writer.write(data[cut:cut + 5])  # staged only
        writer.verify([data[cut + 5:]])
        assert writer.bytes_in_file == cut and writer.bytes_written == cut + 5
        with pytest.raises(DigestMismatch):
            writer.verify([data[cut + 5:-1]])
        assert not writer.temp_path.exists()  # a wrong body keeps nothing


def test_a_writer_created_before_its_response_takes_the_type_and_size_later(root):
    data = b'{"schemaVersion": 2}'
    with open_store(root) as store:
        writer = store.writer(sha(data))
        writer.describe("application/vnd.oci.image.manifest.v1+json", len(data))
        writer.write(data)
        writer.commit()
        assert store.stat(sha(data)).content_type == "application/vnd.oci.image.manifest.v1+json"
        late = store.writer(sha(b"abc"))
        late.describe("bad\ntype", 2)  # cleaned like any content type, and the size is enforced
        assert late.content_type is None
        with pytest.raises(SizeMismatch):
            late.write(b"abc")
    with open_store(root) as reopened:
        assert reopened.stat(sha(data)).content_type == "application/vnd.oci.image.manifest.v1+json"
        assert reopened.stat(sha(b"abc")) is None


# --- damaged entries ---------------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 1]))


def test_a_committed_file_is_verified_until_it_changes_or_the_cache_reopens(root):
    data = blob(7, 5000)
    with open_store(root) as store:
        put(store, data)
        with store.open_blob(sha(data)) as reader:
            assert reader.verified  # hashed as it was written
        flip(store.blob_path(sha(data)), 10)
        with store.open_blob(sha(data)) as reader:
            assert not reader.verified  # any write moves the file's ctime
            assert not store.verify_reader(reader)
        assert sha(data) not in store and not store.blob_path(sha(data)).exists()
        put(store, data)
    with open_store(root) as store:
        with store.open_blob(sha(data)) as reader:
            assert not reader.verified  # found on disk: not known to be intact
            assert store.read_verified(reader, len(data) - 1) is None  # too long to read whole: left alone
            assert store.read_verified(reader, 10_000) == data
        with store.open_blob(sha(data)) as reader:
            assert reader.verified


def test_a_damaged_file_is_dropped_but_not_the_new_copy_that_replaced_it(root):
    data = blob(8, 5000)
    with open_store(root) as store:
        put(store, data)
        old = store.open_blob(sha(data))
        put(store, data)  # a new fill committed the same digest meanwhile
        assert not store.drop_damaged(old, "test")
        old.close()
        assert sha(data) in store and store.blob_path(sha(data)).read_bytes() == data


def test_a_damaged_manifest_read_whole_is_dropped(root):
    data = b'{"schemaVersion": 2}'
    with open_store(root) as store:
        put(store, data)
        flip(store.blob_path(sha(data)), 3)
        with store.open_blob(sha(data)) as reader:
            assert store.read_verified(reader, 4 * MiB) is None
        assert sha(data) not in store


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for a tmpfs"
)
def test_a_cache_on_a_read_only_filesystem_opens_and_serves_what_it_holds(tmp_path):
    mountpoint = tmp_path / f"ro-{uuid.uuid4().hex[:8]}"
    mountpoint.mkdir()
    script = textwrap.dedent(
        f"""
        import hashlib, json, os, subprocess
        from dnsmirror.store import Store
        data = b"cached before the disk went read-only"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with Store.open({str(mountpoint)!r}, 1 << 20) as store:
            with store.writer(digest) as writer:
                writer.write(data)
                writer.commit()
        open(os.path.join({str(mountpoint)!r}, "tmp", "left.part"), "wb").close()  # a crash's leftover
        subprocess.run(["mount", "-o", "remount,ro", {str(mountpoint)!r}], check=True)
        result = {{}}
        with Store.open({str(mountpoint)!r}, 1 << 20) as store:
            result["count"] = store.blob_count
            with store.open_blob(digest) as reader:
                result["data"] = reader.read().decode()
            try:
                store.writer("sha256:" + "0" * 64)
                result["write"] = "allowed"
            except OSError as exc:
                result["write"] = exc.errno
        print(json.dumps(result))
        """
    )
    assert run_on_a_small_tmpfs(mountpoint, script) == {
        "count": 1, "data": "cached before the disk went read-only", "write": errno.EROFS}


# --- blocks written on a thread of their own, one in flight per writer ---------------------------------


def gated_writes(monkeypatch, writer):
    """``writer``'s file writes wait for the returned event; returns (gate, blocks seen by the write call)."""
    real_write = os.write
    gate = threading.Event()
    seen: list[int] = []

    def write(fd, data):
        if fd == writer._fd:
            seen.append(len(data))
            if not gate.wait(10):
                raise AssertionError("the gate was never opened")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return gate, seen


@pytest.mark.parametrize("direct", [True, False])
def test_blocks_reach_the_file_in_order_whatever_each_write_takes(tmp_path, monkeypatch, direct):
    data = os.urandom(7 * STAGE_SIZE + 4321)
    real_write = os.write
    delays = iter([0.02, 0, 0.01, 0, 0, 0.03, 0, 0.01, 0] * 2)

    def uneven(fd, view):
        time.sleep(next(delays, 0))
        return real_write(fd, view)

    monkeypatch.setattr(os, "write", uneven)
    with Store.open(tmp_path / "cache", 64 * STAGE_SIZE, direct_writes=direct) as store:
        writer = store.writer(sha(data))
        for start in range(0, len(data), 300_000):
            writer.write(data[start:start + 300_000])
        info = writer.commit()
        assert info.size == len(data)
        with store.open_blob(sha(data)) as reader:
            assert reader.read() == data


def test_a_lagging_file_write_holds_the_next_block_back(root, monkeypatch):
    data = blob(5, 3 * STAGE_SIZE)
    with open_store(root, max_size=8 * STAGE_SIZE) as store:
        writer = store.writer(sha(data))
        gate, seen = gated_writes(monkeypatch, writer)
        writer.write(data[:STAGE_SIZE])  # handed to a write thread: returns at once
        assert writer.bytes_in_file == 0
        caller = threading.Thread(target=writer.write, args=(data[STAGE_SIZE:],))
        caller.start()
        caller.join(0.3)
        # the second block is staged and hashed, but waits: one block in flight, no more in memory
        assert caller.is_alive() and seen == [STAGE_SIZE]
        gate.set()
        caller.join(10)
        assert not caller.is_alive() and writer.bytes_in_file >= 2 * STAGE_SIZE
        writer.commit()
        assert store.stat(sha(data)).size == len(data)


def test_a_block_failing_on_its_write_thread_stops_caching_and_keeps_hashing(root, monkeypatch):
    data = blob(6, 4 * STAGE_SIZE + 10)
    with open_store(root, max_size=8 * STAGE_SIZE) as store:
        writer = store.writer(sha(data))
        full_disk(monkeypatch, writer, room=STAGE_SIZE + 100)
        writer.write(data[:2 * STAGE_SIZE])  # the second block's write fails on its thread
        assert writer.failure is None  # not known yet: it is seen when the next block goes out
        writer.write(data[2 * STAGE_SIZE:])
        assert isinstance(writer.failure, StoreFull) and writer.bytes_in_file == STAGE_SIZE
        assert os.listdir(root / "tmp") == []
        writer.verify()  # every byte was hashed: the digest matches
        with pytest.raises(StoreFull):
            writer.commit()
        assert sha(data) not in store


def test_an_abort_while_a_block_is_being_written_waits_for_it_and_leaves_nothing(root, monkeypatch):
    data = blob(7, 2 * STAGE_SIZE)
    with open_store(root, max_size=8 * STAGE_SIZE) as store:
        writer = store.writer(sha(data))
        gate, seen = gated_writes(monkeypatch, writer)
        writer.write(data[:STAGE_SIZE])
        fd = writer._fd
        stopping = threading.Thread(target=writer.abort)
        stopping.start()
        stopping.join(0.3)
        assert stopping.is_alive()  # the descriptor is not closed under the write in flight
        os.fstat(fd)
        gate.set()
        stopping.join(10)
        assert not stopping.is_alive() and not writer.temp_path.exists()
        assert os.listdir(root / "tmp") == [] and store.pinned(sha(data)) == 0
