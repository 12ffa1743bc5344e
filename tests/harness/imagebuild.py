"""dnsmirror's own image, built from the project's Dockerfile with no network, for the image test.

``scripts/setup.sh`` leaves two inputs in ``/var/cache/dnsmirror-test`` (once per machine): a Debian
root filesystem with Python, pip and iproute2 (mmdebstrap) and a directory of wheels (dnsmirror's
dependencies and its build backend). :func:`build_dnsmirror_image` turns them into a base image
(``PIP_NO_INDEX`` and ``PIP_FIND_LINKS`` in its environment), then runs ``buildah build`` of the
Dockerfile with ``BASE_IMAGE`` set to it, inside a namespace that has no route anywhere: the build
pulls nothing from outside. The base image is kept as an OCI archive in the cache, so a second run
skips composing it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .netns import Namespace
from .runtimes import Buildah

CACHE_DIR = Path(os.environ.get("DNSMIRROR_TEST_CACHE", "/var/cache/dnsmirror-test"))
ROOT = Path(__file__).resolve().parents[2]
BASE_PACKAGES = "python3,python3-pip,iproute2"  # as in scripts/setup.sh
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PIP_NO_INDEX": "1",
    "PIP_FIND_LINKS": "/wheels",
    "PIP_BREAK_SYSTEM_PACKAGES": "1",  # Debian's Python is marked externally managed; this image is ours
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def _key(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:12]


def image_inputs() -> tuple[Path, Path] | str:
    """``(rootfs tar, wheel directory)`` made by scripts/setup.sh, or the reason they are missing."""
    rootfs = (
        CACHE_DIR / f"debian-rootfs-{_key(f'bookworm essential merged-usr {BASE_PACKAGES}'.encode())}.tar"
    )
    wheels = CACHE_DIR / f"wheels-{_key((ROOT / 'pyproject.toml').read_bytes())}"
    absent = [str(path) for path in (rootfs, wheels) if not path.exists()]
    if absent:
        return f"the image test's inputs are missing ({', '.join(absent)}): run scripts/setup.sh as root"
    return rootfs, wheels


def base_image(buildah: Buildah, rootfs: Path, wheels: Path) -> str:
    """The base image in ``buildah``'s storage (from the cached OCI archive when there is one); its name."""
    name = "localhost/dnsmirror-test-base:" + _key(f"{rootfs.name} {wheels.name}".encode())
    archive = CACHE_DIR / f"base-{name.rsplit(':', 1)[1]}.oci.tar"
    if archive.exists():
        image_id = (
            buildah.run(["pull", "--quiet", f"oci-archive:{archive}"], timeout=300)
            .stdout.decode()
            .split()[-1]
        )
        buildah.run(["tag", image_id, name])
        return name
    container = buildah.run(["from", "--quiet", "scratch"]).stdout.decode().strip()
    buildah.run(["add", container, str(rootfs), "/"], timeout=300)
    buildah.run(["copy", container, str(wheels), "/wheels"])
    buildah.run(["config", *(part for key, value in BASE_ENV.items() for part in ("--env", f"{key}={value}")),
                 container])
    buildah.run(["commit", "--quiet", "--rm", container, name], timeout=300)
    partial = archive.with_name(f"{archive.name}.partial.{os.getpid()}")
    buildah.run(["push", "--quiet", name, f"oci-archive:{partial}"], timeout=300)
    os.replace(partial, archive)
    for stale in CACHE_DIR.glob("base-*.oci.tar"):  # of older inputs
        if stale != archive:
            stale.unlink(missing_ok=True)
    return name


def build_dnsmirror_image(builder: Namespace, workdir: Path, *, ssl_cert_file: str | os.PathLike[str],
                          tag: str = "localhost/dnsmirror:test") -> Buildah:
    """Build the Dockerfile in ``builder`` (a namespace with no route out); return the Buildah holding
    ``tag``, trusting ``ssl_cert_file`` for a push. The caller closes it."""
    inputs = image_inputs()
    if isinstance(inputs, str):
        raise RuntimeError(inputs)
    # overlay: the base is ~130 MB, which vfs would copy for every container and commit
    buildah = Buildah(builder, workdir, ssl_cert_file=ssl_cert_file, driver="overlay")
    try:
        base = base_image(buildah, *inputs)
        buildah.run(
            [
                "build",
                "--quiet",
                "--isolation",
                "chroot",
                "--pull-never",
                "--build-arg",
                f"BASE_IMAGE={base}",
                "--tag",
                tag,
                "--file",
                str(ROOT / "Dockerfile"),
                str(ROOT),
            ],
            timeout=600,
        )
    except BaseException:
        buildah.close()
        raise
    return buildah
