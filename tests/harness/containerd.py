"""Debian's containerd 1.6 as the node's image puller, inside a namespace, with no registry config.

Each :class:`Containerd` has its own root, state, sockets and config in a work directory, the CRI
plugin's ``registry.config_path = ""`` (no hosts.toml: default pulls, as on an unconfigured node) and
an environment whose ``SSL_CERT_FILE`` the caller chooses (Go reads it once, at start). ``ctr`` runs
in the same namespace with the same trust file, because with ``ctr images pull`` the HTTPS client is
the ctr process; a CRI pull (:mod:`harness.cri`) makes the daemon fetch.

    with Containerd(node_ns, tmp / "containerd", ssl_cert_file=trust) as containerd:
        containerd.pull("123456789012.dkr.ecr.us-east-1.amazonaws.com/team/app:v1")
        assert containerd.has_snapshot(image.platform("linux/amd64").chain_id)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .netns import HarnessError, Namespace, Process, clean_env

K8S_NAMESPACE = "k8s.io"
_DISABLED_PLUGINS = [
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
]


def _toml_string(value: str | os.PathLike[str]) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` in this mount namespace, deepest first."""
    prefix = str(directory.resolve())
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


class Containerd:
    """A containerd daemon in ``namespace`` rooted at ``workdir``; ``socket`` is its gRPC address."""

    def __init__(
        self,
        namespace: Namespace,
        workdir: str | os.PathLike[str],
        *,
        ssl_cert_file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
        runs_containers: bool = False,
    ) -> None:
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.socket = self.workdir / "containerd.sock"
        self.config_path = self.workdir / "config.toml"
        self.ssl_cert_file = ssl_cert_file
        self.env = clean_env(ssl_cert_file, **dict(env or {}))
        self.log_level = log_level
        # runc needs the machine's /sys (cgroups), which ip netns exec hides: see Namespace.nsenter_argv
        self.runs_containers = runs_containers
        self.process: Process | None = None

    def config(self) -> str:
        """The daemon's config.toml: private paths, CRI with no registry configuration."""
        empty = self.workdir / "empty"
        lines = [
            "version = 2",
            f"root = {_toml_string(self.root)}",
            f"state = {_toml_string(self.state)}",
            f"disabled_plugins = [{', '.join(_toml_string(name) for name in _DISABLED_PLUGINS)}]",
            "[grpc]",
            f"  address = {_toml_string(self.socket)}",
            "[ttrpc]",
            f"  address = {_toml_string(str(self.socket) + '.ttrpc')}",
            "[debug]",
            f"  level = {_toml_string(self.log_level)}",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_string(self.workdir / 'opt')}",
            '[plugins."io.containerd.grpc.v1.cri"]',
            '  sandbox_image = "dnsmirror.invalid/pause:never-pulled"',
            '  stream_server_address = "127.0.0.1"',
            '[plugins."io.containerd.grpc.v1.cri".cni]',
            f"  bin_dir = {_toml_string(empty)}",
            f"  conf_dir = {_toml_string(empty)}",
            '[plugins."io.containerd.grpc.v1.cri".registry]',
            '  config_path = ""',
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15) -> Containerd:
        """Write the config, start the daemon and wait until its socket answers."""
        for directory in (self.root, self.state, self.workdir / "empty"):
            directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        argv = ["containerd", "--config", str(self.config_path)]
        if self.runs_containers:
            self.process = self.namespace.start(self.namespace.nsenter_argv(argv), "containerd", env=self.env,
                                                exec_prefix=())
        else:
            self.process = self.namespace.start(argv, "containerd", env=self.env)
        self.process.wait_until(self._socket_answers, "serving on its socket", timeout)
        return self

    def _socket_answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self, *, remove: bool = True) -> None:
        """Stop the daemon, unmount anything left under its work directory and (by default) remove it."""
        if self.process is not None:
            self.process.stop(timeout=10)
        for point in _mounts_under(self.workdir):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=10)
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Containerd:
        try:
            return self.start()
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ raises
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def ctr(self, args: Sequence[str], *, namespace: str = K8S_NAMESPACE, timeout: float = 120,
            check: bool = True, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run ``ctr -a SOCKET -n NAMESPACE ARGS`` in the daemon's network namespace, with its trust file."""
        command = ["ctr", "-a", str(self.socket), "-n", namespace, *args]
        return self.namespace.run(command, env={**self.env, **dict(env or {})}, timeout=timeout, check=check)

    def pull(self, reference: str, *, user: str | None = None, platform: str | None = None,
             all_platforms: bool = False, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """``ctr images pull [--user U:P] REFERENCE`` (ctr fetches, the daemon unpacks the platform)."""
        args = ["images", "pull"]
        if user:
            args += ["--user", user]
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        return self.ctr([*args, reference], timeout=timeout, check=check)

    def images(self) -> list[str]:
        """Names of the images in the k8s.io namespace."""
        return self.ctr(["images", "ls", "-q"]).stdout.decode().split()

    def remove_image(self, reference: str) -> None:
        """Delete an image record (its content goes at the next garbage collection)."""
        self.ctr(["images", "rm", "--sync", reference])

    def content_digests(self) -> set[str]:
        """Digests of every blob in the content store."""
        return set(self.ctr(["content", "ls", "-q"]).stdout.decode().split())

    def has_snapshot(self, chain_id: str, snapshotter: str = "overlayfs") -> bool:
        """True when the snapshotter has committed ``chain_id``, i.e. the layers were unpacked."""
        done = self.ctr(["snapshots", "--snapshotter", snapshotter, "info", chain_id], check=False)
        return done.returncode == 0

    def unpacked_files(self, path: str) -> list[bytes]:
        """Contents of ``path`` in every unpacked overlayfs layer (an empty list when no layer has it)."""
        snapshots = self.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
        found = []
        with contextlib.suppress(FileNotFoundError):
            for snapshot in snapshots.iterdir():
                candidate = snapshot / "fs" / path
                if candidate.is_file():
                    found.append(candidate.read_bytes())
        return found

    def log(self) -> str:
        """The daemon's output so far (it logs to stderr)."""
        if self.process is None:
            raise HarnessError("containerd was not started")
        return self.process.stderr()
