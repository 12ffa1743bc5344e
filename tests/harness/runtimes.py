"""Container engines as a node's image pullers, inside a namespace, with no registry configuration.

Each engine gets private directories under a work directory (storage, state, locks, auth, network
config), so nothing is read from or left in ``/etc/containers``, ``/run/containers``, ``/dev/shm`` or
``/var/lib/docker``, and trusts exactly the ``SSL_CERT_FILE`` it is given. Storage is ``vfs`` by
default: no overlay mounts to leak, and the test images are small (the image build uses ``overlay``).

- :class:`Dockerd`: Debian's dockerd 20.10. ``ip netns exec`` remounts ``/sys`` and dockerd then fails
  with "Devices cgroup isn't mounted", so it runs under ``nsenter --net`` in a mount namespace of its
  own (:meth:`~harness.netns.Namespace.nsenter_argv`) where the node's resolv.conf and hosts are
  bind-mounted over ``/etc``; no
  iptables, no bridge, its own data root, exec root, pidfile and socket. The ``docker`` client talks
  to it over that socket (the daemon does the HTTPS).
- :class:`Podman` and :class:`Buildah`: daemonless; run in the namespace with ``ip netns exec`` and a
  ``containers.conf`` / ``storage.conf`` / empty ``registries.conf`` of their own.

:func:`missing` says why an engine cannot run here (its binary is absent), for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .netns import HarnessError, Namespace, Process, clean_env

RUN_DOCKER = Path("/run/docker")
DOCKER_CLIENT = "/usr/bin/docker"  # Debian's client, matching the daemon (another may come first on PATH)
# the Debian package that provides each engine's binaries (for skip reasons)
PACKAGES = {"dockerd": "docker.io", DOCKER_CLIENT: "docker.io", "podman": "podman", "buildah": "buildah",
            "runc": "runc", "containerd-shim-runc-v2": "containerd", "nsenter": "util-linux",
            "unshare": "util-linux"}


def missing(*programs: str) -> str | None:
    """None when every program is installed, else a reason naming what is absent."""
    absent = [program for program in programs if shutil.which(program, path=os.environ.get("PATH", "") +
                                                               ":/usr/sbin:/sbin") is None]
    if not absent:
        return None
    return "not installed: " + ", ".join(f"{program} (Debian package {PACKAGES.get(program, program)})"
                                         for program in absent)


class Dockerd:
    """dockerd (and its own containerd) in ``namespace``'s network, rooted at ``workdir``."""

    def __init__(self, namespace: Namespace, workdir: str | os.PathLike[str], *,
                 ssl_cert_file: str | os.PathLike[str]) -> None:
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.socket = self.workdir / "docker.sock"
        self.env = clean_env(ssl_cert_file)
        self.client_config = self.workdir / "client"
        self.process: Process | None = None
        self._made_run_docker = False

    def start(self, timeout: float = 60) -> Dockerd:
        """Start the daemon and wait until its API answers."""
        # dockerd makes /run/docker/plugins whatever its exec root: removed on stop if it was not there
        self._made_run_docker = not RUN_DOCKER.exists()
        for name in ("data", "exec", "client"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        daemon = [
            "dockerd",
            "--data-root",
            str(self.workdir / "data"),
            "--exec-root",
            str(self.workdir / "exec"),
            "--pidfile",
            str(self.workdir / "docker.pid"),
            "--host",
            f"unix://{self.socket}",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--storage-driver=vfs",
            "--config-file",
            str(self._daemon_json()),
        ]
        self.process = self.namespace.start(self.namespace.nsenter_argv(daemon), "dockerd", env=self.env,
                                            exec_prefix=())
        self.process.wait_until(self._answers, "serving its API", timeout)
        return self

    def _daemon_json(self) -> Path:
        # an empty daemon.json: no registry mirrors, no insecure registries
        path = self.workdir / "daemon.json"
        path.write_text("{}\n")
        return path

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return self.docker(["version"], check=False, timeout=10).returncode == 0

    def docker(self, args: Sequence[str], *, timeout: float = 120, check: bool = True,
               input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the ``docker`` client against this daemon (its own client config, so no stored login leaks)."""
        env = clean_env(DOCKER_HOST=f"unix://{self.socket}", DOCKER_CONFIG=str(self.client_config))
        done = subprocess.run(
            [DOCKER_CLIENT, *args], capture_output=True, timeout=timeout, env=env, input=input
        )
        if check and done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise HarnessError(f"docker {' '.join(args)} exited {done.returncode}\n{output}\n{self.log()}")
        return done

    def login(self, host: str, user: str, password: str) -> None:
        """``docker login`` (the daemon checks the credential against the registry)."""
        self.docker(["login", "--username", user, "--password-stdin", host], input=password.encode())

    def logout(self, host: str) -> None:
        self.docker(["logout", host], check=False)

    def pull(self, reference: str, *, check: bool = False) -> subprocess.CompletedProcess[bytes]:
        return self.docker(["pull", reference], check=check)

    def remove_all_images(self) -> None:
        """Forget every image and its layers, so the next pull fetches them again."""
        ids = self.docker(["images", "-aq"]).stdout.decode().split()
        if ids:
            self.docker(["rmi", "--force", *sorted(set(ids))])

    def log(self) -> str:
        return self.process.describe(60) if self.process is not None else ""

    def stop(self) -> None:
        """Stop the daemon (its mount namespace goes with it) and remove the work directory."""
        if self.process is not None:
            self.process.stop(timeout=15)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._made_run_docker:
            for directory in (RUN_DOCKER / "plugins", RUN_DOCKER):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only when empty: never what another daemon keeps there

    def __enter__(self) -> Dockerd:
        try:
            return self.start()
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ raises
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ContainersTool:
    """podman or buildah in ``namespace`` with private storage, state, locks, auth and configuration."""

    program = ""

    def __init__(self, namespace: Namespace, workdir: str | os.PathLike[str], *,
                 ssl_cert_file: str | os.PathLike[str], driver: str = "vfs") -> None:
        self.namespace = namespace
        self.driver = driver
        self.workdir = Path(workdir)
        self.ssl_cert_file = ssl_cert_file
        # podman refuses a runroot path longer than 50 characters
        self.runroot = Path(tempfile.mkdtemp(prefix=f"dmh-{os.getpid()}-run-"))
        self._write_config()

    def _write_config(self) -> None:
        work = self.workdir
        for name in ("storage", "tmp", "networks", "cache"):
            (work / name).mkdir(parents=True, exist_ok=True)
        (work / "registries.conf").write_text("")  # no mirrors, no search registries, no aliases
        (work / "auth.json").write_text(json.dumps({"auths": {}}))
        (work / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (work / "storage.conf").write_text(
            f'[storage]\ndriver = "{self.driver}"\ngraphroot = "{work / "storage"}"\nrunroot = '
            f'"{self.runroot}"\n'
        )
        (work / "containers.conf").write_text(
            "[engine]\n"
            'lock_type = "file"\n'  # the default shm lock is /dev/shm/libpod_lock, shared by every podman
            f'tmp_dir = "{work / "tmp"}"\n'
            'events_logger = "none"\n'
            'cgroup_manager = "cgroupfs"\n'
            "[network]\n"
            f'network_config_dir = "{work / "networks"}"\n'
        )

    def env(self) -> dict[str, str]:
        work = self.workdir
        return clean_env(self.ssl_cert_file, CONTAINERS_CONF=str(work / "containers.conf"),
                         CONTAINERS_STORAGE_CONF=str(work / "storage.conf"),
                         CONTAINERS_REGISTRIES_CONF=str(work / "registries.conf"),
                         REGISTRY_AUTH_FILE=str(work / "auth.json"), XDG_RUNTIME_DIR=str(self.runroot),
                         XDG_CACHE_HOME=str(work / "cache"), TMPDIR=str(work / "tmp"))

    def run(
        self, args: Sequence[str], *, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the tool in the namespace."""
        work = self.workdir
        argv = [self.program, "--root", str(work / "storage"), "--runroot", str(self.runroot),
                "--storage-driver", self.driver, *args]
        return self.namespace.run(argv, env=self.env(), timeout=timeout, check=check)

    def reset_storage(self) -> None:
        """Forget every image and layer (a fresh node's store), keeping the configuration."""
        self.run(["rmi", "--all", "--force"], check=False)
        for directory in (self.workdir / "storage", self.runroot):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()

    def close(self) -> None:
        self.reset_storage()
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)

    def __enter__(self) -> ContainersTool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Podman(ContainersTool):
    """``podman pull`` as a node would run it."""

    program = "podman"

    def run(
        self, args: Sequence[str], *, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        return super().run(["--log-level", "error", *args],
                           timeout=timeout, check=check)

    def pull(self, reference: str, *, creds: str | None = None,
             check: bool = False) -> subprocess.CompletedProcess[bytes]:
        args = ["pull", "--signature-policy", str(self.workdir / "policy.json")]
        if creds:
            args += ["--creds", creds]
        return self.run([*args, reference], check=check)


class Buildah(ContainersTool):
    """``buildah build`` of a Containerfile whose ``FROM`` is a captured image (no ``RUN``: no runtime
    needed)."""

    program = "buildah"

    def build_from(
        self,
        reference: str,
        *,
        creds: str | None = None,
        tag: str = "localhost/dnsmirror-built:1",
        check: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        context = self.workdir / "context"
        context.mkdir(exist_ok=True)
        (context / "added.txt").write_text("added by buildah\n")
        (context / "Containerfile").write_text(f"FROM {reference}\nCOPY added.txt /added.txt\n"
                                               'LABEL built.by="dnsmirror-test"\n')
        args = ["build", "--pull-always", "--isolation", "chroot", "--signature-policy",
                str(self.workdir / "policy.json"), "--tag", tag, "--file", str(context / "Containerfile")]
        if creds:
            args += ["--creds", creds]
        return self.run([*args, str(context)], check=check, timeout=180)
