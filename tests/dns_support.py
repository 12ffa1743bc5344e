"""Real processes for DNS integration tests: dnsmirror itself, unbound as the upstream resolver, dig.

Everything listens on 127.0.0.1 on free ports; every process is stopped by its context manager.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from dnslib import DNSRecord

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def wait_for_dns(port: int, host: str = "127.0.0.1", seconds: float = 15.0) -> None:
    """Block until a DNS server listens on host:port over UDP.

    Probes with a STATUS-opcode query, which servers answer at once (NOTIMP) without forwarding.
    """
    deadline = time.monotonic() + seconds
    probe = DNSRecord.question("probe.invalid")
    probe.header.opcode = 2
    query = probe.pack()
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            try:
                sock.sendto(query, (host, port))
                sock.recvfrom(4096)
                return
            except OSError:
                time.sleep(0.1)
    raise TimeoutError(f"nothing answers DNS on {host}:{port}")


def stop(process: subprocess.Popen, seconds: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(seconds)


def unbound_server_lines(workdir: Path, port: int) -> list[str]:
    """The ``server:`` block of an unbound on 127.0.0.1:port in the foreground that queries no address
    at all; the caller adds the zones it answers from (and ``remote-control:``)."""
    return [
        "server:",
        f"  interface: 127.0.0.1@{port}",
        f"  port: {port}",
        "  do-daemonize: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{workdir}"',
        f'  pidfile: "{workdir}/unbound-{port}.pid"',
        "  use-syslog: no",
        '  logfile: ""',
        "  verbosity: 0",
        "  access-control: 127.0.0.0/8 allow",
        '  module-config: "iterator"',
        "  do-ip6: no",
        "  num-threads: 1",
        "  do-not-query-address: 0.0.0.0/0",
        "  do-not-query-address: ::0/0",
        '  local-zone: "test." nodefault',
    ]


@contextlib.contextmanager
def unbound(tmp: Path, records: list[str], port: int | None = None):
    """unbound on 127.0.0.1:port, authoritative for the zones of ``records`` (zone = last two labels).

    unbound resolves CNAME chains within those zones; it may query no address at all
    (``do-not-query-address`` covers everything), so nothing ever leaves the machine.
    """
    port = port or free_port()
    workdir = tmp / f"unbound-{port}"
    workdir.mkdir()
    zones: dict[str, list[str]] = {}
    for record in records:
        owner = record.split()[0].rstrip(".")
        zones.setdefault(".".join(owner.split(".")[-2:]), []).append(record)
    lines = unbound_server_lines(workdir, port)
    for zone, zone_records in zones.items():
        zonefile = workdir / f"{zone}.zone"
        zonefile.write_text("\n".join([
            f"{zone}. 300 IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 300",
            f"{zone}. 300 IN NS ns.{zone}.",
            f"ns.{zone}. 300 IN A 192.0.2.1",
            *zone_records,
        ]) + "\n")
        lines += ["auth-zone:", f'  name: "{zone}."', f'  zonefile: "{zonefile}"',
                  "  for-downstream: yes", "  for-upstream: yes"]
    lines += ["remote-control:", "  control-enable: no"]
    conf = workdir / "unbound.conf"
    conf.write_text("\n".join(lines) + "\n")
    binary = shutil.which("unbound") or "/usr/sbin/unbound"
    process = subprocess.Popen(
        [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_dns(port)
        yield port
    finally:
        stop(process)


@contextlib.contextmanager
def silent_udp_server():
    """A loopback UDP port that receives queries and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def dnsmirror_serve(tmp: Path, overrides: dict, wait: bool = True, nofile: int | None = None,
                    prefix: tuple[str, ...] = (), preexec=None):
    """``dnsmirror serve`` with the embedded default plus ``overrides``; yields (port, process, logfile).

    ``nofile``: the process's descriptor limit (soft and hard), as ``ulimit -n`` would set it. ``prefix``:
    a command that execs the rest (e.g. ``setpriv`` dropping a capability). ``preexec``: called in the
    child before it execs (after the descriptor limit).
    """
    port = free_port()
    # DNS only: no HTTPS listener (so no CA); health follows a stand-in listener the test controls
    document = {
        "dns": {"listen": [f"127.0.0.1:{port}"], "timeout": "500ms"},
        "https": {"listen": []},
        "health": {"targets": [f"127.0.0.1:{free_port()}"]},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }
    for key, value in overrides.items():
        document.setdefault(key, {})
        if isinstance(value, dict):
            document[key].update(value)
        else:
            document[key] = value
    config = tmp / f"dnsmirror-{port}.yaml"
    config.write_text(yaml.safe_dump(document))
    log_path = tmp / f"dnsmirror-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    def before_exec() -> None:
        if nofile:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if preexec is not None:
            preexec()

    process = subprocess.Popen([*prefix, sys.executable, "-m", "dnsmirror", "serve", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env,
                               preexec_fn=before_exec if nofile or preexec else None)
    try:
        if wait:
            wait_for_dns(port)
        yield port, process, log_path
    finally:
        stop(process)
        log.close()


@contextlib.contextmanager
def capturing_mirror(tmp: Path, upstream: int, captured: str, address: str, address6: str | None = None,
                     dns: dict | None = None):
    """``dnsmirror serve`` forwarding to 127.0.0.1:``upstream`` whose HTTPS stand-in listener is up, once
    it answers ``captured`` with ``address``; yields (port, process, logfile).

    Health is checked every 200 ms and one failure fails open, so the DNS process fails open about
    1.6 s after the last word from the mirror part.
    """
    https_port = free_port()
    overrides = {
        "dns": {"upstreams": [f"127.0.0.1:{upstream}"], **(dns or {})},
        "mirror": {"address": address, **({"address6": address6} if address6 else {})},
        "health": {
            "interval": "200ms",
            "timeout": "100ms",
            "failures": 1,
            "targets": [f"127.0.0.1:{https_port}"],
        },
    }

    def captures(port: int) -> bool:
        answers = dig_answers(dig(port, captured, timeout=1).stdout)
        return bool(answers) and answers[0][3] == address

    with tcp_listener(https_port), dnsmirror_serve(tmp, overrides) as (port, process, log):
        assert wait_until(lambda: captures(port), 10), log.read_text()
        # ready once every DNS process (dns.processes) captures, each pinned and prioritised by then
        metrics = yaml.safe_load((tmp / f"dnsmirror-{port}.yaml").read_text())["metrics"]["listen"]
        assert wait_until(lambda: http_status(f"http://{metrics}/readyz") == 200, 10), log.read_text()
        yield port, process, log


def http_status(url: str) -> int | None:
    """The status of a GET of ``url``; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@contextlib.contextmanager
def tcp_listener(port: int):
    """A plain TCP listener on 127.0.0.1:port: the stand-in for the HTTPS listener's health."""
    import threading

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    sock.settimeout(0.2)
    stopping = threading.Event()

    def accept() -> None:
        # accepted and closed, so a long test's probes never fill the backlog
        while not stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.close()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield sock
    finally:
        stopping.set()
        acceptor.join(5)
        sock.close()


def dig(
    port: int, name: str, qtype: str = "A", *options: str, timeout: int = 3
) -> subprocess.CompletedProcess:
    """Run real dig against 127.0.0.1:port; one try, bounded time."""
    command = ["dig", "-p", str(port), "@127.0.0.1", name, qtype, f"+time={timeout}", "+tries=1", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout * 4 + 5)


def dig_status(output: str) -> str:
    for line in output.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return "NO ANSWER"


def dig_flags(output: str) -> set[str]:
    for line in output.splitlines():
        if line.startswith(";; flags:"):
            return set(line.split(":")[1].split(";")[0].split())
    return set()


def dig_answers(output: str) -> list[tuple[str, int, str, str]]:
    """(name, ttl, type, data) of the ANSWER SECTION of dig's output."""
    answers = []
    section = False
    for line in output.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            section = True
            continue
        if section:
            if not line.strip() or line.startswith(";;"):
                break
            parts = line.split(None, 4)
            answers.append((parts[0], int(parts[1]), parts[3], parts[4] if len(parts) > 4 else ""))
    return answers


def wait_until(predicate, seconds: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()




def refusing_port() -> int:
    """A loopback port with nothing listening: UDP queries get ICMP port unreachable, TCP gets a reset."""
    return free_port()


@contextlib.contextmanager
def dnsmasq(tmp: Path, host_records: dict[str, str], port: int | None = None, *options: str):
    """dnsmasq on 127.0.0.1:port answering ``host_records`` (name -> IPv4) itself; no other server."""
    port = port or free_port()
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    command = [binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--user=root",
               f"--pid-file={tmp}/dnsmasq-{port}.pid", "--listen-address=127.0.0.1", "--bind-interfaces",
               f"--port={port}", "--cache-size=0",
               *[f"--host-record={n},{a}" for n, a in host_records.items()], *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_dns(port)
        yield port
    finally:
        stop(process)


class FakeUpstream:
    """A hostile or slow upstream on 127.0.0.1 (UDP and TCP on one port), run in a thread of the test.

    ``spoof``: every answer carries the query's ID but another question (``evil.example A 6.6.6.6``).
    Otherwise it answers ``address`` for any A question after ``delay`` seconds. ``queries`` counts
    what it received. Stops by itself when the context ends.
    """

    def __init__(self, spoof: bool = False, address: str = "192.0.2.77", delay: float = 0.0) -> None:
        import threading

        self.spoof = spoof
        self.address = address
        self.delay = delay
        self.queries = 0
        self.port = free_port()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", self.port))
        self.tcp.listen(64)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self._serve_tcp, daemon=True)]

    def answer(self, query: bytes) -> bytes:
        from dnslib import RR, A

        request = DNSRecord.parse(query)
        if self.spoof:
            forged = DNSRecord.question("evil.example")
            forged.header.id = request.header.id
            reply = forged.reply()
            reply.add_answer(RR("evil.example", rdata=A("6.6.6.6"), ttl=300))
            return reply.pack()
        reply = request.reply()
        reply.add_answer(RR(request.q.qname, rdata=A(self.address), ttl=300))
        return reply.pack()

    def _serve_udp(self) -> None:
        self.udp.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                data, addr = self.udp.recvfrom(4096)
            except OSError:
                continue
            self.queries += 1
            if self.delay:
                time.sleep(self.delay)
            with contextlib.suppress(Exception):
                self.udp.sendto(self.answer(data), addr)

    def _serve_tcp(self) -> None:
        self.tcp.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(Exception):
                conn.settimeout(2)
                length = int.from_bytes(conn.recv(2), "big")
                data = b""
                while len(data) < length:
                    data += conn.recv(length - len(data))
                self.queries += 1
                answer = self.answer(data)
                conn.sendall(len(answer).to_bytes(2, "big") + answer)

    def __enter__(self) -> FakeUpstream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(5)
        self.udp.close()
        self.tcp.close()


def timed_dig(
    port: int, name: str, *options: str, timeout: int = 3
) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    result = dig(port, name, "A", *options, timeout=timeout)
    return time.monotonic() - started, result


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of any of its threads)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            found += [int(child) for child in listing.read().split()]
    return found


def realtime_allowed() -> bool:
    """Whether a process started here may run at real-time priority (root or ``CAP_SYS_NICE``, and a
    cgroup the kernel gives real-time time)."""
    probe = "import os; os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode == 0


_BUSY_LOOP = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


@contextlib.contextmanager
def busy_machine(seconds: float = 60):
    """Every core of the machine busy (a loop per core at the lowest priority, ending by itself after
    ``seconds``) while the block runs: a DNS process takes real-time priority only on a busy machine."""
    loops = [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", _BUSY_LOOP, str(seconds)])
             for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
