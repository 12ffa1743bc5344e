"""Small multi-arch OCI images built with the standard library, and pushes with ``skopeo``.

:func:`build_image` writes an OCI image layout: per platform a gzip layer with a couple of files (their
content names the platform and a per-build nonce, so every build has fresh digests), a config and a
manifest; an index over the platforms; optionally one shared uncompressed layer of random bytes of a
given size for big-blob tests. :func:`push_image` copies it to a registry with
``skopeo copy --all --preserve-digests``, run inside a namespace with a chosen trust file.

    image = build_image(tmp / "layout", tag="v1", big_layer_size=64 << 20)
    push_image(image, node_ns, "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/app:v1",
    ca_file=ca.cert_path)
    image.index.digest, image.platform("linux/amd64").layers[0].digest, image.blobs()
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import secrets
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .netns import Namespace, clean_env

INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
BIG_FILE_PATH = "data/random.bin"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob in the layout: what a descriptor says about it, and where it is on disk."""

    digest: str
    size: int
    media_type: str
    path: Path

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class PlatformImage:
    """One platform's manifest, config and layers; ``files`` maps each small file's path to its content."""

    platform: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def chain_id(self) -> str:
        """The chain ID of the top layer: the snapshot name containerd commits when it unpacks."""
        chain = self.diff_ids[0]
        for diff_id in self.diff_ids[1:]:
            chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
        return chain


@dataclass(frozen=True)
class BuiltImage:
    """A multi-arch image in an OCI layout directory, under ``tag``."""

    layout_dir: Path
    tag: str
    index: Blob
    platforms: tuple[PlatformImage, ...]
    big_layer: Blob | None = None

    @property
    def source(self) -> str:
        """The skopeo source name, ``oci:DIR:TAG``."""
        return f"oci:{self.layout_dir}:{self.tag}"

    def platform(self, name: str) -> PlatformImage:
        """The image for ``os/arch``, e.g. ``linux/amd64``."""
        for image in self.platforms:
            if image.platform == name:
                return image
        raise KeyError(name)

    def blobs(self) -> list[Blob]:
        """Every blob of the image (index, manifests, configs, layers) once, index first."""
        seen: dict[str, Blob] = {self.index.digest: self.index}
        for image in self.platforms:
            for blob in (image.manifest, image.config, *image.layers):
                seen.setdefault(blob.digest, blob)
        return list(seen.values())


def _write_blob(layout_dir: Path, data: bytes, media_type: str) -> Blob:
    digest = hashlib.sha256(data).hexdigest()
    path = layout_dir / "blobs" / "sha256" / digest
    path.write_bytes(data)
    return Blob(f"sha256:{digest}", len(data), media_type, path)


def _write_json_blob(layout_dir: Path, document: object, media_type: str) -> Blob:
    return _write_blob(layout_dir, json.dumps(document, sort_keys=True).encode(), media_type)


def _tar_member(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, mode, 0, "root", "root"
    return info


def _small_layer(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of ``files`` (directories implied by the paths are added first)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        directories = sorted({str(Path(path).parent) for path in files} - {"."})
        for directory in directories:
            info = _tar_member(directory + "/", 0, 0o755)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        for path, content in files.items():
            archive.addfile(_tar_member(path, len(content)), io.BytesIO(content))
    return buffer.getvalue()


class _RandomReader(io.RawIOBase):
    """``size`` random bytes, read in chunks (the big layer is never held in memory)."""

    def __init__(self, size: int) -> None:
        self.remaining = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.remaining if n < 0 else min(n, self.remaining)
        self.remaining -= n
        return os.urandom(n)


def _big_layer(layout_dir: Path, size: int, file_path: str = BIG_FILE_PATH) -> Blob:
    """An uncompressed tar layer holding one file (``file_path``) of ``size`` random bytes, streamed to
    disk."""

    class HashingWriter:
        """The file object tarfile writes to: hashes and counts on the way to disk."""

        def __init__(self, target: io.BufferedWriter) -> None:
            self.target, self.hash, self.size = target, hashlib.sha256(), 0

        def write(self, data: bytes) -> int:
            self.hash.update(data)
            self.size += len(data)
            return self.target.write(data)

        def tell(self) -> int:
            return self.size

    blobs = layout_dir / "blobs" / "sha256"
    with tempfile.NamedTemporaryFile(dir=blobs, delete=False) as raw:
        writer = HashingWriter(raw)  # type: ignore[arg-type]
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT, bufsize=_CHUNK) as archive:
            directory = _tar_member("data/", 0, 0o755)
            directory.type = tarfile.DIRTYPE
            archive.addfile(directory)
            archive.addfile(_tar_member(file_path, size), _RandomReader(size))
    digest = writer.hash.hexdigest()
    path = blobs / digest
    os.replace(raw.name, path)
    return Blob(f"sha256:{digest}", writer.size, LAYER_TAR_MEDIA_TYPE, path)


def build_image(layout_dir: str | os.PathLike[str], *, tag: str = "v1",
                platforms: Sequence[str] = ("linux/amd64", "linux/arm64"),
                big_layer_size: int = 0, more_big_layers: Sequence[int] = (),
                nonce: str | None = None) -> BuiltImage:
    """Build an image index over ``platforms`` into a new OCI layout at ``layout_dir``.

    Each platform gets its own small gzip layer (``hello.txt``, ``etc/dnsmirror-test/platform``); with
    ``big_layer_size`` every platform also shares a first, uncompressed layer with ``data/random.bin``
    of that many random bytes, and with ``more_big_layers`` one more such layer per size after it
    (``data/random-N.bin``), for images of several big layers. ``nonce`` (random by default) goes into the
    files: same nonce, same digests.
    """
    layout_dir = Path(layout_dir)
    (layout_dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    nonce = nonce or secrets.token_hex(8)
    big_layer = _big_layer(layout_dir, big_layer_size) if big_layer_size else None
    shared = ((big_layer,) if big_layer else ()) + tuple(
        _big_layer(layout_dir, size, f"data/random-{number}.bin")
        for number, size in enumerate(more_big_layers, start=1)
    )
    images = []
    for platform in platforms:
        os_name, architecture = platform.split("/")[:2]
        files = {
            "hello.txt": f"hello from a dnsmirror test image ({nonce})\n".encode(),
            "etc/dnsmirror-test/platform": f"{platform} {nonce}\n".encode(),
        }
        tar = _small_layer(files)
        layer = _write_blob(layout_dir, gzip.compress(tar, mtime=0), LAYER_GZIP_MEDIA_TYPE)
        layers = (*shared, layer)
        diff_ids = (*(blob.digest for blob in shared), "sha256:" + hashlib.sha256(tar).hexdigest())
        config = _write_json_blob(
            layout_dir,
            {
                "architecture": architecture,
                "os": os_name,
                "config": {
                    "Env": ["PATH=/usr/bin:/bin"],
                    "Cmd": ["/bin/true"],
                    "Labels": {"dnsmirror.test.nonce": nonce},
                },
                "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            },
            CONFIG_MEDIA_TYPE,
        )
        manifest = _write_json_blob(layout_dir, {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(),
            "layers": [blob.descriptor() for blob in layers],
        }, MANIFEST_MEDIA_TYPE)
        images.append(PlatformImage(platform, manifest, config, layers, diff_ids, files))
    index = _write_json_blob(layout_dir, {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [
            {**image.manifest.descriptor(), "platform": {"os": image.platform.split("/")[0],
                                                         "architecture": image.platform.split("/")[1]}}
            for image in images
        ],
    }, INDEX_MEDIA_TYPE)
    (layout_dir / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{**index.descriptor(), "annotations": {REF_NAME_ANNOTATION: tag}}],
    }))
    return BuiltImage(layout_dir, tag, index, tuple(images), big_layer)


def _skopeo_files(directory: Path) -> tuple[Path, Path]:
    """A signature policy that accepts anything and an empty auth file, in ``directory``."""
    policy, auth = directory / "policy.json", directory / "auth.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    auth.write_text(json.dumps({"auths": {}}))
    return policy, auth


def skopeo(namespace: Namespace, args: Sequence[str], *, ca_file: str | os.PathLike[str],
           timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run ``skopeo ARGS`` in ``namespace`` trusting only ``ca_file``, with an empty auth file and an
    accept-anything signature policy (no user or system configuration leaks in)."""
    with tempfile.TemporaryDirectory(prefix="dmh-skopeo-") as scratch:
        policy, auth = _skopeo_files(Path(scratch))
        env = clean_env(ca_file, REGISTRY_AUTH_FILE=str(auth), DOCKER_CONFIG=scratch, TMPDIR=scratch)
        command = ["skopeo", "--policy", str(policy), *args]
        return namespace.run(command, env=env, timeout=timeout, check=check)


def skopeo_copy(namespace: Namespace, source: str, destination: str, *, ca_file: str | os.PathLike[str],
                src_creds: str | None = None, dest_creds: str | None = None, all_platforms: bool = True,
                extra_args: Sequence[str] = (), timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """``skopeo copy [--all] --preserve-digests SOURCE DESTINATION`` in ``namespace``; creds are
    ``user:pass``."""
    args = ["copy", "--preserve-digests"]
    if all_platforms:
        args.append("--all")
    if src_creds:
        args += ["--src-creds", src_creds]
    if dest_creds:
        args += ["--dest-creds", dest_creds]
    return skopeo(namespace, [*args, *extra_args, source, destination], ca_file=ca_file, timeout=timeout,
                  check=check)


def push_image(image: BuiltImage, namespace: Namespace, reference: str, *, ca_file: str | os.PathLike[str],
               creds: str | None = None, timeout: float = 120) -> None:
    """Push every platform of ``image`` to ``reference`` (``HOST/REPO:TAG``), digests unchanged."""
    skopeo_copy(namespace, image.source, f"docker://{reference}", ca_file=ca_file, dest_creds=creds,
                timeout=timeout)
