"""Network namespaces for end-to-end tests: a private L2 segment that N namespaces share.

A :class:`Cluster` owns a dedicated "switch" namespace holding a bridge; every member namespace
(registry, node, peers, ...) gets one veth pair whose outer end is plugged into that bridge and whose
inner end is ``eth0`` with an address in a private ``10.X.Y.0/24`` chosen per run. The veth pairs are
created inside the switch namespace, so nothing ever appears in the machine's own namespace, and no
namespace has a route anywhere else: traffic stays between namespaces the test created.

Each member has ``/etc/netns/NAME/resolv.conf`` (a loopback nameserver by default, so a lookup never
reaches the machine's resolver) and ``/etc/netns/NAME/hosts``; ``ip netns exec`` bind-mounts them over
``/etc`` for every process started in the namespace.

Names are ``dmh-<pid>-<random>-<role>``: two runs (in a row or in parallel) never collide, and
:func:`cleanup_stale` removes what a run whose process is gone left behind.

    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        node = cluster.add("node", hosts={"reg.example": registry_ns.address})
        server = node.start(["prog", "--flag"], name="prog")
        server.wait_listening(443)
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "dmh"
NETNS_RUN_DIR = Path("/var/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
# ``ip netns exec`` with a nameserver nobody serves: lookups fail at once instead of leaving the namespace
DEFAULT_RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
# Go reads SSL_CERT_DIR (default: /etc/ssl/certs and friends) on top of SSL_CERT_FILE: a path that does
# not exist makes SSL_CERT_FILE the only trust source
NO_CERT_DIR = "/nonexistent/dnsmirror-test-no-cert-dir"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CLONE_NEWNET = 0x40000000
_TCP_LISTEN = "0A"

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A harness step failed (a command, a readiness wait); the message carries the process output."""


def ip(*args: str, timeout: float = 10) -> str:
    """Run ``ip ARGS`` and return its stdout; raise :class:`HarnessError` with stderr when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def clean_env(ssl_cert_file: str | os.PathLike[str] | None = None, **extra: str) -> dict[str, str]:
    """A minimal environment for processes under test: no proxy or CA variables inherited from this shell.

    With ``ssl_cert_file``, Go programs (containerd, ctr, skopeo, the registry) trust exactly that file.
    """
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    if ssl_cert_file is not None:
        env["SSL_CERT_FILE"] = str(ssl_cert_file)
        env["SSL_CERT_DIR"] = NO_CERT_DIR
    env.update(extra)
    return env


def netns_available() -> str | None:
    """None when namespaces can be used here, else the reason (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    try:
        ip("netns", "list")
    except (HarnessError, OSError) as error:
        return f"ip netns is unavailable: {error}"
    return None


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on the machine."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    """The pid of the run that created a harness name (``dmh-<pid>-...``), or None for other names."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
        return None
    return int(parts[1])


def _kill_namespace_processes(name: str) -> None:
    """SIGKILL whatever still runs in a harness namespace (all of it was started by the harness)."""
    with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
        for pid in ip("netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def delete_namespace(name: str) -> None:
    """Kill what runs in a namespace, delete it (its veth ends go with it) and its ``/etc/netns`` dir."""
    _kill_namespace_processes(name)
    if (NETNS_RUN_DIR / name).exists():
        with contextlib.suppress(HarnessError):
            ip("netns", "del", name)
    shutil.rmtree(NETNS_ETC_DIR / name, ignore_errors=True)


def cleanup_stale() -> list[str]:
    """Delete harness namespaces (and ``/etc/netns`` dirs) whose creating process no longer exists."""
    names = set(list_namespaces())
    if NETNS_ETC_DIR.is_dir():
        names.update(entry.name for entry in NETNS_ETC_DIR.iterdir())
    stale = sorted(
        name
        for name in names
        if (pid := _owner_pid(name)) is not None and pid != os.getpid() and not _pid_alive(pid)
    )
    for name in stale:
        delete_namespace(name)
    return stale


def _setns(name: str) -> None:
    """Move the calling thread (only it) into the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(NETNS_RUN_DIR / name, "rb") as handle:
        if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({name}): {os.strerror(error)}")


class Process:
    """A background process started in a namespace; stdout and stderr go to files in ``log_dir``.

    ``pid`` is the program's own pid (``ip netns exec`` execs it), so :meth:`stop` stops the server.
    """

    def __init__(self, namespace: Namespace, argv: Sequence[str], name: str, *,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 exec_prefix: Sequence[str] | None = None) -> None:
        self.namespace = namespace
        self.name = name
        self.argv = list(argv)
        log_dir = namespace.cluster.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{namespace.role}-{name}-{secrets.token_hex(3)}"
        self.stdout_path = log_dir / f"{stem}.out"
        self.stderr_path = log_dir / f"{stem}.err"
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.popen = subprocess.Popen(
                [*(namespace.exec_argv([]) if exec_prefix is None else exec_prefix), *self.argv],
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                env=dict(env) if env is not None else clean_env(), cwd=cwd,
                # own process group: a stop also reaches children the server may have spawned
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def stdout(self) -> str:
        """Everything the process wrote to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def whole_lines(self, stderr_too: bool = False) -> list[str]:
        """The lines the process wrote to stdout (then stderr) so far, without one still being written."""
        streams = (self.stdout(), self.stderr()) if stderr_too else (self.stdout(),)
        return [line for text in streams for line in text[:text.rfind("\n") + 1].splitlines()]

    def describe(self, tail: int = 40) -> str:
        """A short report (argv, exit status, last lines of output) for failure messages."""
        lines = (self.stdout() + self.stderr()).splitlines()[-tail:]
        status = "running" if self.alive() else f"exited {self.popen.returncode}"
        return f"{self.name} ({status}): {' '.join(self.argv)}\n" + "\n".join(lines)

    def listening(self, port: int) -> bool:
        """True when a TCP socket in the process's namespace listens on ``port`` (any address)."""
        for table in ("tcp", "tcp6"):
            try:
                rows = Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                return False
            for row in rows:
                fields = row.split()
                if fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
        return False

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 15) -> None:
        """Poll ``ready`` until true; raise with the process output if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not self.alive():
                raise HarnessError(f"{self.name} exited before {what}\n{self.describe()}")
            time.sleep(0.02)
        raise HarnessError(f"{self.name} not {what} after {timeout}s\n{self.describe()}")

    def wait_listening(self, port: int, timeout: float = 15) -> None:
        """Wait until the process's namespace has a TCP listener on ``port``."""
        self.wait_until(lambda: self.listening(port), f"listening on port {port}", timeout)

    def signal(self, signum: int) -> None:
        """Send a signal to the process (not its group)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, timeout: float = 5) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the whole process group; return the exit status."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.popen.wait(timeout)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class Namespace:
    """One member of a :class:`Cluster`: a named network namespace with ``eth0`` on the shared subnet."""

    def __init__(self, cluster: Cluster, role: str, name: str, address: str) -> None:
        self.cluster = cluster
        self.role = role
        self.name = name
        self.address = address
        self.addresses = [address]
        self.etc_dir = NETNS_ETC_DIR / name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r}, {self.address})"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def nsenter_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` in this network namespace and a mount namespace of its own, ``/sys`` left as it is.

        ``ip netns exec`` remounts ``/sys`` for the namespace, which hides the cgroup hierarchies that
        dockerd and runc need ("Devices cgroup isn't mounted"). Here the namespace's resolv.conf and hosts
        are bind-mounted over ``/etc`` in a mount namespace of its own (gone with the process; a slave, so
        namespaces added later under /run/netns appear in it), then ``nsenter --net`` execs the program
        (its pid stays the program's).
        """
        script = (f"mount --bind {shlex.quote(str(self.etc_dir / 'resolv.conf'))} /etc/resolv.conf && "
                  f"mount --bind {shlex.quote(str(self.etc_dir / 'hosts'))} /etc/hosts && "
                  f"exec nsenter --net={shlex.quote(str(NETNS_RUN_DIR / self.name))} "
                  + " ".join(shlex.quote(part) for part in argv))
        return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script]

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60,
            check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a command to completion inside the namespace; with ``check``, raise with its output on failure.

        ``env`` defaults to :func:`clean_env` (nothing inherited from the test's own environment).
        """
        done = subprocess.run(self.exec_argv(argv), capture_output=True, timeout=timeout, input=input,
                              env=dict(env) if env is not None else clean_env())
        if check and done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise HarnessError(f"in {self.name}: {' '.join(argv)} exited {done.returncode}\n{output}")
        return done

    def start(self, argv: Sequence[str], name: str | None = None, *, env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None, exec_prefix: Sequence[str] | None = None) -> Process:
        """Start a background process in the namespace; the cluster stops it at the latest on close.

        ``env`` defaults to :func:`clean_env`. ``exec_prefix`` replaces ``ip netns exec NAME`` for a program
        that enters the namespace itself (e.g. with ``nsenter``).
        """
        process = Process(self, argv, name or Path(argv[0]).name, env=env, cwd=cwd, exec_prefix=exec_prefix)
        self.cluster.processes.append(process)
        return process

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``function`` on a thread that joined this network namespace; sockets it opens live here.

        Only the network namespace changes (``/etc/hosts`` stays the machine's): connect by address.
        """
        outcome: dict[str, Any] = {}

        def in_namespace() -> None:
            try:
                _setns(self.name)
                outcome["value"] = function(*args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = error

        thread = threading.Thread(target=in_namespace, name=f"netns-{self.role}", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def write_hosts(self, hosts: Mapping[str, str]) -> None:
        """Write the namespace's ``/etc/hosts``: localhost plus ``name -> address`` for each entry."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        lines += [f"{address} {host}" for host, address in hosts.items()]
        (self.etc_dir / "hosts").write_text("\n".join(lines) + "\n")

    def write_resolv_conf(self, nameservers: Iterable[str], options: str = "timeout:1 attempts:2") -> None:
        """Point the namespace's resolver at ``nameservers`` (e.g. a dnsmirror DNS listener)."""
        lines = [f"nameserver {server}" for server in nameservers] + [f"options {options}"]
        (self.etc_dir / "resolv.conf").write_text("\n".join(lines) + "\n")

    def limit_egress(self, rate: str, burst: str = "64kb", latency: str = "500ms") -> None:
        """Cap what leaves ``eth0`` at ``rate`` (tc's syntax, e.g. ``"40mbit"``): a slow upstream, so that
        tests can act while a transfer is still under way. :meth:`unlimit_egress` lifts it."""
        self.run(["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", burst,
                  "latency", latency], timeout=10)

    def limit_egress_fairly(self, rate_mbit: float, clients: Sequence[str]) -> None:
        """Cap what leaves ``eth0`` at ``rate_mbit`` Mbit/s, shared fairly among ``clients`` (IPv4 addresses):
        htb with one class per client (guaranteed an even share, allowed the whole rate) and one for
        everything else, as on a real link where a short answer to one client does not wait behind another
        client's bulk transfer, which :meth:`limit_egress`'s single queue makes it do (this kernel has no
        fq_codel). :meth:`unlimit_egress` lifts it."""
        share = rate_mbit / (len(clients) + 1)
        device = ["dev", "eth0"]
        self.run(["tc", "qdisc", "replace", *device, "root", "handle", "1:", "htb", "default", "ff"],
                 timeout=10)
        self.run(["tc", "class", "replace", *device, "parent", "1:", "classid", "1:1", "htb",
                  "rate", f"{rate_mbit}mbit", "ceil", f"{rate_mbit}mbit"], timeout=10)
        classes = [(f"1:{index + 2:x}", address) for index, address in enumerate(clients)]
        for classid, _ in [*classes, ("1:ff", "")]:
            # a small quantum: the classes take turns in a few packets, not 200 KB at a time
            self.run(["tc", "class", "replace", *device, "parent", "1:1", "classid", classid, "htb",
                      "rate", f"{share}mbit", "ceil", f"{rate_mbit}mbit", "quantum", "6000"], timeout=10)
        for classid, address in classes:
            self.run(["tc", "filter", "add", *device, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                      "match", "ip", "dst", f"{address}/32", "flowid", classid], timeout=10)

    def unlimit_egress(self) -> None:
        """Remove a limit set by :meth:`limit_egress` or :meth:`limit_egress_fairly`."""
        self.run(["tc", "qdisc", "del", "dev", "eth0", "root"], timeout=10, check=False)

    def add_address6(self) -> str:
        """Give ``eth0`` a fresh address of the cluster's IPv6 ULA subnet (usable at once: no DAD); return
        it."""
        address = self.cluster.allocate_address6()
        ip(
            "-n",
            self.name,
            "addr",
            "add",
            f"{address}/{self.cluster.network6.prefixlen}",
            "dev",
            "eth0",
            "nodad",
        )
        self.addresses.append(address)
        return address

    def remove_ipv4(self) -> None:
        """Take the IPv4 address off ``eth0``: an IPv6-only member (``address`` becomes its first IPv6)."""
        ip("-n", self.name, "addr", "del", f"{self.address}/{self.cluster.network.prefixlen}", "dev", "eth0")
        self.addresses.remove(self.address)
        self.address = next(address for address in self.addresses if ":" in address)

    def add_address(self, address: str | None = None) -> str:
        """Add another address of the shared subnet to ``eth0`` (a fresh one by default); return it."""
        address = address or self.cluster.allocate_address()
        ip("-n", self.name, "addr", "add", f"{address}/{self.cluster.network.prefixlen}", "dev", "eth0")
        self.addresses.append(address)
        return address


class Cluster:
    """Namespaces on one private subnet, joined by a bridge in a dedicated switch namespace.

    A context manager: on exit (also after a failure) it stops the processes it started, kills anything
    left in its namespaces, deletes the namespaces (veths go with them), ``/etc/netns/NAME`` and its
    work directory.
    """

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, keep_workdir: bool = False) -> None:
        self.run_id = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.network = ipaddress.ip_network(f"10.{random.randint(64, 254)}.{random.randint(0, 255)}.0/24")
        self._hosts = iter(self.network.hosts())
        next(self._hosts)  # .1 stays free, the usual gateway address, in case a test wants one
        # a ULA /64 (inside fd00::/8, which dnsmirror's dns.allow admits) for members that want IPv6
        self.network6 = ipaddress.ip_network(
            f"fd{random.randint(0, 255):02x}:{random.randint(0, 0xFFFF):x}:{random.randint(0, 0xFFFF):x}::/64"
        )
        self._hosts6 = iter(self.network6.hosts())
        next(self._hosts6)
        self.switch = f"{self.run_id}-sw"
        self.members: list[Namespace] = []
        self.processes: list[Process] = []
        self._owns_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"{self.run_id}-"))
        )
        self.keep_workdir = keep_workdir
        self._created: list[str] = []
        self._ports = 0

    def __enter__(self) -> Cluster:
        cleanup_stale()
        try:
            self._create_namespace(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _create_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def allocate_address(self) -> str:
        """A subnet address no member uses yet."""
        return str(next(self._hosts))

    def allocate_address6(self) -> str:
        """An IPv6 subnet address no member uses yet."""
        return str(next(self._hosts6))

    def add(self, role: str, *, hosts: Mapping[str, str] | None = None,
            nameservers: Iterable[str] | None = None) -> Namespace:
        """Create a member namespace on the subnet, with its own hosts file and resolv.conf."""
        name = f"{self.run_id}-{role}"
        address = self.allocate_address()
        self._create_namespace(name)
        member = Namespace(self, role, name, address)
        self.members.append(member)
        member.etc_dir.mkdir(parents=True, exist_ok=True)
        if nameservers is None:
            (member.etc_dir / "resolv.conf").write_text(DEFAULT_RESOLV_CONF)
        else:
            member.write_resolv_conf(nameservers)
        member.write_hosts(hosts or {})
        self._ports += 1
        port = f"p{self._ports}"
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", name, "addr", "add", f"{address}/{self.network.prefixlen}", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        return member

    def close(self) -> None:
        """Stop processes, delete namespaces and ``/etc/netns`` entries, remove the work directory."""
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop(timeout=3)
        for name in reversed(self._created):
            delete_namespace(name)
        self._created.clear()
        if self._owns_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
