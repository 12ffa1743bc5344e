"""TLS handshakes: dnsmirror's per-SNI listener against nginx serving one static ECDSA certificate.

Both servers run pinned to core 0 (taskset), one after the other in the same run, on loopback; the load
comes from client processes pinned to core 1. Measured:

- full handshakes per second (TLS 1.3, no resumption) with a cached leaf, and per CPU-second of the
  server's core (the fair figure when the client core, not the server, is the limit);
- handshake latency, one client at a time: a cached name, a never-seen name (leaf minted during the
  handshake), and nginx.

Writes the ``tls`` section of bench/RESULTS.md.

    .venv/bin/python bench/tls_handshake.py --seconds 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procstat import cpu_seconds, process_tree

from dnsmirror import ca, config, tls

SERVER_CORE = 0
CLIENT_CORE = 1
CACHED_NAME = "123456789012.dkr.ecr.us-east-1.amazonaws.com"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_context() -> ssl.SSLContext:
    # the client skips verification so that its core spends as little as possible per handshake
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    return context


def handshake(context: ssl.SSLContext, port: int, name: str) -> float:
    """One full handshake; returns its duration (connect included) in seconds."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=name):
            pass
    return time.perf_counter() - started


def _load_worker(port: int, name: str, deadline: float, results) -> None:
    os.sched_setaffinity(0, {CLIENT_CORE})
    context = client_context()
    done = failed = 0
    while time.monotonic() < deadline:
        try:
            handshake(context, port, name)
            done += 1
        except OSError:
            failed += 1
    results.put((done, failed))


def measure_rate(port: int, name: str, pids: list[int], seconds: float, workers: int) -> dict:
    results = multiprocessing.Queue()
    deadline = time.monotonic() + seconds
    cpu_before = cpu_seconds(pids)
    started = time.monotonic()
    processes = [multiprocessing.Process(target=_load_worker, args=(port, name, deadline, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    counts = [results.get(timeout=seconds + 30) for _ in processes]
    for process in processes:
        process.join(timeout=10)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pids) - cpu_before
    done = sum(c[0] for c in counts)
    return {"rate": done / elapsed, "cpu": cpu / elapsed, "per_cpu": done / cpu if cpu else float("nan"),
            "failed": sum(c[1] for c in counts), "done": done}


def latencies(port: int, names, rounds: int) -> list[float]:
    context = client_context()
    return [handshake(context, port, next(names)) * 1000 for _ in range(rounds)]


def wait_port(port: int, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited: {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.contextmanager
def dnsmirror_server(workdir: Path):
    ca_dir = workdir / "ca"
    port = free_port()
    document = (
        f"dns: {{listen: ['127.0.0.1:{free_port()}'], upstreams: ['127.0.0.1:{free_port()}']}}\n"
        f"https: {{listen: ['127.0.0.1:{port}']}}\n"
        f"tls: {{ca_cert: {ca_dir / 'ca.crt'}, ca_key: {ca_dir / 'ca.key'}, leaf_cache_size: 100000}}\n"
        "log: {level: warning}\n"
        f"cache: {{dir: {workdir / 'cache'}}}\n"
        "metrics: {listen: null}\n"
    )
    (workdir / "dnsmirror.yaml").write_text(document)
    process = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CORE), sys.executable, "-m", "dnsmirror", "serve",
         "--config", str(workdir / "dnsmirror.yaml")],
        stdout=subprocess.DEVNULL, stderr=open(workdir / "dnsmirror.log", "wb"))  # noqa: SIM115
    try:
        wait_port(port, process, "dnsmirror")
        yield port, [process.pid]
    finally:
        stop(process)


@contextlib.contextmanager
def nginx_server(workdir: Path, nginx: str):
    """nginx, one worker, one static ECDSA P-256 leaf + the same intermediate as dnsmirror sends."""
    ca_dir = workdir / "ca"
    authority, _ = ca.load_authority(ca_dir / "ca.crt", ca_dir / "ca.key", config.load().capture)
    key = ca.new_key()
    leaf = tls.mint_leaf(authority, key, CACHED_NAME, tls.MAX_LEAF_VALIDITY,
                         datetime.datetime.now(datetime.UTC).timestamp())
    (workdir / "nginx.crt").write_bytes(ca.pem(leaf) + ca.pem(authority.cert))
    ca.write_private(workdir / "nginx.key", ca.key_pem(key))
    port = free_port()
    temp = workdir / "nginx-temp"
    temp.mkdir()
    (workdir / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy; fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {workdir}/nginx.crt;
    ssl_certificate_key {workdir}/nginx.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ return 503; }}
  }}
}}
""")
    process = subprocess.Popen(["taskset", "-c", str(SERVER_CORE), nginx, "-p", str(workdir), "-c",
                                str(workdir / "nginx.conf"), "-e", str(workdir / "nginx-error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, process, "nginx")
        yield port, process_tree(process.pid, children=1)
    finally:
        stop(process)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each rate measurement")
    parser.add_argument("--workers", type=int, default=4, help="client processes (all on core 1)")
    parser.add_argument("--rounds", type=int, default=300, help="handshakes per latency series")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if os.cpu_count() < 2 or not Path(nginx).exists() or shutil.which("taskset") is None:
        raise SystemExit("needs 2 cores, nginx and taskset (scripts/setup.sh bench)")
    os.sched_setaffinity(0, {CLIENT_CORE})
    with tempfile.TemporaryDirectory(prefix="dnsmirror-tls-bench-") as tmp:
        workdir = Path(tmp)
        ca.init_directory(workdir / "ca", config.load().capture)
        with dnsmirror_server(workdir) as (port, pids):
            latencies(port, iter(lambda: CACHED_NAME, None), 20)  # warm up: mint the cached leaf
            ours = measure_rate(port, CACHED_NAME, pids, args.seconds, args.workers)
            cached = latencies(port, iter(lambda: CACHED_NAME, None), args.rounds)
            run = secrets.token_hex(3)
            fresh_names = (f"{run}{i}.dkr.ecr.eu-west-1.amazonaws.com" for i in range(10**9))
            first_seen = latencies(port, fresh_names, args.rounds)
        with nginx_server(workdir, nginx) as (port, pids):
            latencies(port, iter(lambda: CACHED_NAME, None), 20)
            theirs = measure_rate(port, CACHED_NAME, pids, args.seconds, args.workers)
            nginx_latency = latencies(port, iter(lambda: CACHED_NAME, None), args.rounds)

    def row(label, result):
        return (
            f"| {label} | {result['rate']:,.0f} | {result['cpu'] * 100:.0f}% | {result['per_cpu']:,.0f} | "
            f"{result['failed']} |"
        )

    def lat(label, values):
        return (f"| {label} | {statistics.median(values):.2f} | {percentile(values, 0.9):.2f} | "
                f"{percentile(values, 0.99):.2f} |")

    added = statistics.median(first_seen) - statistics.median(cached)
    added_p99 = percentile(first_seen, 0.99) - percentile(cached, 0.99)
    from results import machine, write_section

    body = f"""## TLS: full handshakes, dnsmirror (per-SNI leaves) vs nginx (one static ECDSA certificate)

Command: `.venv/bin/python bench/tls_handshake.py --seconds {args.seconds:g} --workers {args.workers} \
--rounds {args.rounds}` (servers pinned to core {SERVER_CORE} with taskset, one after the other in the same \
run; {args.workers} Python client processes pinned to core {CLIENT_CORE}; TLS 1.3, X25519, ECDSA P-256 leaf \
+ intermediate, no resumption, client does not verify; loopback).
Measured: {machine()}. The machine is shared with other work: expect some noise.

| server | handshakes/s | server CPU (of its core) | handshakes per CPU-second | failed |
|---|---:|---:|---:|---:|
{row("nginx 1 worker, static certificate", theirs)}
{row("dnsmirror, cached leaf", ours)}

- **dnsmirror / nginx: {ours["rate"] / theirs["rate"] * 100:.0f}% of the handshake rate**, \
{ours["per_cpu"] / theirs["per_cpu"] * 100:.0f}% per CPU-second of the server core (target >= 50%). When a \
server's CPU is below 100% the client core, not the server, set its rate; the per-CPU-second column is then \
the fairer comparison.

Handshake latency, one client, one handshake at a time (connect + handshake, ms, {args.rounds} each):

| series | p50 | p90 | p99 |
|---|---:|---:|---:|
{lat("nginx, static certificate", nginx_latency)}
{lat("dnsmirror, cached leaf", cached)}
{lat("dnsmirror, never-seen name (leaf minted in the handshake)", first_seen)}

- **A never-seen name adds {added:.2f} ms at the median** ({added_p99:.2f} ms at p99) to the handshake \
(target < 5 ms): signing one leaf and building its context, on the reactor, inside the SNI callback.
"""
    print(body)
    if not args.no_write:
        write_section("tls", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
