"""The forwarder against real resolvers on loopback (unbound, dnsmasq) and real dig: an upstream that
recovers, identical questions merged, 2,000 pipelined TCP queries with the descriptors bounded."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
import time
import urllib.request

import pytest
import yaml
from dns_support import (
    FakeUpstream,
    children,
    dig_answers,
    dig_status,
    dnsmasq,
    dnsmirror_serve,
    free_port,
    silent_udp_server,
    timed_dig,
    unbound,
    wait_until,
)
from dnslib import QTYPE, RCODE, DNSRecord

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("dig") or not shutil.which("dnsmasq") and not os.path.exists(
        "/usr/sbin/dnsmasq"), reason="dig and dnsmasq are needed (scripts/setup.sh installs them)"),
]

NAME = "www.example.test"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_an_upstream_that_recovers_is_used_again_without_a_timeout(tmp_path, transport):
    options = ("+tcp",) if transport == "tcp" else ()
    recovering = free_port()
    with silent_udp_server() as dead, dnsmirror_serve(
        tmp_path, {"dns": {"upstreams": [f"127.0.0.1:{dead}", f"127.0.0.1:{recovering}"], "timeout": "1s"}}
    ) as (port, _, log):
        metrics = yaml.safe_load((tmp_path / f"dnsmirror-{port}.yaml").read_text())["metrics"]["listen"]

        def upstreams_down() -> float:
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
                text = response.read().decode()
            return next(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith("dnsmirror_dns_upstreams_down "))

        # both down: nothing can answer
        _, result = timed_dig(port, NAME, *options, timeout=4)
        assert dig_status(result.stdout) == "SERVFAIL", result.stdout
        assert wait_until(lambda: upstreams_down() == 2, 5)
        with dnsmasq(tmp_path, {NAME: "192.0.2.20"}, recovering):
            # a probe finds it; from then on it goes first, before the dead one listed ahead of it
            assert wait_until(lambda: "dns_upstream_up" in log.read_text(), 15), log.read_text()
            assert wait_until(lambda: upstreams_down() == 1, 5)
            for _ in range(3):
                elapsed, result = timed_dig(port, NAME, *options)
                assert dig_answers(result.stdout) == [(f"{NAME}.", 0, "A", "192.0.2.20")], result.stdout
                assert elapsed < 0.5, f"the recovered upstream was not used first: {elapsed:.2f}s"


@pytest.mark.parametrize("processes", [1, 2])
def test_identical_questions_in_flight_become_one_upstream_query_per_dns_process(tmp_path, processes):
    with FakeUpstream(address="192.0.2.55", delay=0.3) as slow, dnsmirror_serve(
        tmp_path, {"dns": {"upstreams": [f"127.0.0.1:{slow.port}"], "timeout": "2s", "processes": processes}}
    ) as (port, process, _):
        answering = len(children(process.pid))
        assert answering == min(processes, len(os.sched_getaffinity(0)))
        query = DNSRecord.question("same.example.test")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(3)
            for qid in range(1, 31):
                query.header.id = qid
                client.sendto(query.pack(), ("127.0.0.1", port))
            answers = [DNSRecord.parse(client.recvfrom(4096)[0]) for _ in range(30)]
        assert sorted(a.header.id for a in answers) == list(range(1, 31))
        assert all(str(a.a.rdata) == "192.0.2.55" for a in answers)
        assert 1 <= slow.queries <= answering  # each process merges what it reads; they share no state


def descriptors(pid: int) -> int:
    """Open descriptors of ``pid`` and all its descendants (dnsmirror answers DNS in a child process)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            total += len(os.listdir(f"/proc/{current}/fd"))
            for task_dir in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task_dir}/children") as children:
                    pending += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def test_two_thousand_pipelined_tcp_queries_with_descriptors_bounded(tmp_path):
    count = 2000
    records = [f"host{i}.example.test. 300 IN A 192.0.2.{i % 250 + 1}" for i in range(0, count, 2)]
    with unbound(tmp_path, records) as upstream, dnsmirror_serve(
        tmp_path, {"dns": {"upstreams": [f"127.0.0.1:{upstream}"], "timeout": "2s"}}, nofile=256
    ) as (port, process, log):
        idle = descriptors(process.pid)
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                peak[0] = max(peak[0], descriptors(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stream = b""
        for i in range(count):
            packet = DNSRecord.question(f"host{i}.example.test").pack()
            packet = struct.pack("!H", i) + packet[2:]
            stream += struct.pack("!H", len(packet)) + packet
        answers: dict[int, DNSRecord] = {}
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(stream)
            buffer = b""
            deadline = time.monotonic() + 60
            while len(answers) < count and time.monotonic() < deadline:
                chunk = client.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack_from("!H", buffer)[0]:
                    length = struct.unpack_from("!H", buffer)[0]
                    answer = DNSRecord.parse(buffer[2:2 + length])
                    answers[answer.header.id] = answer
                    buffer = buffer[2 + length:]
        done.set()
        sampler.join(5)
        assert len(answers) == count, f"{len(answers)} of {count} answered\n{log.read_text()[-3000:]}"
        for i, answer in answers.items():
            assert str(answer.q.qname) == f"host{i}.example.test.", i
            if i % 2 == 0:
                assert answer.header.rcode == RCODE.NOERROR and answer.a.rtype == QTYPE.A, answer
                assert str(answer.a.rdata) == f"192.0.2.{i % 250 + 1}", answer
            else:
                assert answer.header.rcode == RCODE.NXDOMAIN, answer
        # the old forwarder held one descriptor per query in flight (2,005 for this test)
        assert peak[0] - idle <= 64, f"descriptors: {idle} idle, {peak[0]} at the peak"
