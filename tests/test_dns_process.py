"""``serve`` answers DNS in a process of its own: it keeps answering while the mirror part is stuck
(failing open once the mirror's word is stale), is restarted when it dies, and ends with its parent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dns_support import (
    busy_machine,
    capturing_mirror,
    children,
    dig,
    dig_answers,
    dnsmirror_serve,
    free_port,
    realtime_allowed,
    unbound,
    wait_until,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("dig"), reason="dig is not installed (scripts/setup.sh installs it)"),
]

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
MIRROR = "10.96.0.53"
REAL = "192.0.2.99"


def answer(port: int, name: str = ECR) -> str | None:
    answers = dig_answers(dig(port, name, timeout=1).stdout)
    return answers[0][3] if answers else None


def healthy_mirror(tmp_path, processes: int):
    with (
        unbound(tmp_path, [f"{ECR}. 300 IN A {REAL}", "www.example.test. 300 IN A 192.0.2.10"]) as upstream,
        capturing_mirror(tmp_path, upstream, ECR, MIRROR, dns={"processes": processes}) as running,
    ):
        yield running


@pytest.fixture
def mirror(tmp_path):
    """A healthy DNS-only dnsmirror forwarding to unbound; yields (port, parent process, log path)."""
    yield from healthy_mirror(tmp_path, 1)


# dns.processes: 2 on a machine with two cores or more (else one)
TWO = min(2, len(os.sched_getaffinity(0)))


@pytest.fixture
def mirror_two(tmp_path):
    """As ``mirror``, with ``dns.processes: 2``."""
    yield from healthy_mirror(tmp_path, 2)


def test_dns_answers_while_the_mirror_process_is_stopped_and_fails_open(mirror):
    port, process, log = mirror
    os.kill(process.pid, signal.SIGSTOP)
    try:
        assert answer(port) == MIRROR  # still captured: the last word said healthy and is fresh
        assert answer(port, "www.example.test") == "192.0.2.10"
        # the mirror part says nothing more: captured names now resolve to the registry itself
        assert wait_until(lambda: answer(port) == REAL, 6)
        assert answer(port, "www.example.test") == "192.0.2.10"
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert wait_until(lambda: answer(port) == MIRROR, 5), log.read_text()


@pytest.mark.parametrize(("running", "expected"), [("mirror", 1), ("mirror_two", TWO)])
def test_a_killed_dns_process_is_replaced(request, running, expected):
    port, process, log = request.getfixturevalue(running)
    before = children(process.pid)
    assert len(before) == expected
    os.kill(before[0], signal.SIGKILL)
    assert wait_until(lambda: answer(port) == MIRROR, 10), log.read_text()
    assert wait_until(lambda: len(children(process.pid)) == expected, 10), log.read_text()
    assert before[0] not in children(process.pid)
    assert "dns_process_restart" in log.read_text()


@pytest.mark.skipif(TWO < 2, reason="one core: one DNS process")
def test_each_dns_process_has_a_core_of_its_own_and_one_held_up_holds_no_answer(mirror_two):
    port, process, log = mirror_two
    pids = children(process.pid)
    # each pins itself as it starts
    assert wait_until(lambda: [len(os.sched_getaffinity(pid)) for pid in pids] == [1, 1], 10), log.read_text()
    assert len({frozenset(os.sched_getaffinity(pid)) for pid in pids}) == 2, log.read_text()
    for held in pids:
        os.kill(held, signal.SIGSTOP)  # its core taken by other work, as far as its queries can tell
        try:
            for _ in range(10):
                assert answer(port) == MIRROR
                assert answer(port, "www.example.test") == "192.0.2.10"
        finally:
            os.kill(held, signal.SIGCONT)
    assert children(process.pid) == pids  # nothing was replaced: the held one was not silent for long


@pytest.mark.parametrize("running", ["mirror", "mirror_two"])
def test_the_dns_process_ends_with_the_mirror_process(request, running):
    _, process, _ = request.getfixturevalue(running)
    pids = children(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(5)
    deadline = time.monotonic() + 5
    for child in pids:
        while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
            with open(f"/proc/{child}/stat") as stat:
                if stat.read().split(")")[1].split()[0] == "Z":
                    break  # ended; a zombie until init reaps it
            time.sleep(0.05)
        else:
            assert not os.path.exists(f"/proc/{child}"), "a DNS process outlived its parent"


def test_dns_own_process_false_answers_from_the_mirror_process(tmp_path):
    with (
        unbound(tmp_path, [f"{ECR}. 300 IN A {REAL}"]) as upstream,
        dnsmirror_serve(
            tmp_path, {"dns": {"upstreams": [f"127.0.0.1:{upstream}"], "own_process": False}}
        ) as (port, process, _),
    ):
        assert answer(port) == REAL  # not healthy: fails open
        assert children(process.pid) == []


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def nice_of(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def priority_settled(metrics_port: int, pid: int) -> bool:
    # the mirror process settles the gap on each DNS process's first report
    return (len(children(pid)) == 1 and metric(metrics_port, "dnsmirror_dns_processes") == 1
            and metric(metrics_port, "dnsmirror_dns_priority_gap") == 5)


def test_the_dns_process_runs_above_the_mirror_in_a_session_of_its_own(tmp_path):
    metrics_port = free_port()
    quiet = {"upstreams": [f"127.0.0.1:{free_port()}"]}  # nothing is forwarded off this machine
    overrides = {"metrics": {"listen": f"127.0.0.1:{metrics_port}"}, "dns": quiet}
    with dnsmirror_serve(tmp_path, overrides) as (_, process, log), busy_machine():
        assert wait_until(lambda: priority_settled(metrics_port, process.pid), 10), log.read_text()
        for child in children(process.pid):
            assert nice_of(process.pid) - nice_of(child) == 5
            # a scheduling group of its own where the kernel groups by session, as a resolver's own service
            assert os.getsid(child) == child != os.getsid(process.pid)
            if os.geteuid() == 0:  # allowed to raise its own priority: the mirror process keeps its own
                assert nice_of(process.pid) == nice_of(0)
                # and its session's scheduling group's, where the kernel groups tasks by session
                if os.path.exists(f"/proc/{child}/autogroup"):
                    assert Path(f"/proc/{child}/autogroup").read_text().split()[-1] == "-5"
            if realtime_allowed():
                # and to run at the lowest real-time priority, with the kernel's limit on runs that never wait
                assert os.sched_getscheduler(child) == os.SCHED_RR
                assert os.sched_getparam(child).sched_priority == 1
                assert os.sched_getscheduler(process.pid) == os.SCHED_OTHER
                assert "Max realtime timeout      200000               2000000" in Path(
                    f"/proc/{child}/limits"
                ).read_text()
            else:
                assert os.sched_getscheduler(child) == os.SCHED_OTHER
        if realtime_allowed():
            assert wait_until(lambda: metric(metrics_port, "dnsmirror_dns_realtime") == 1, 5)
        else:
            assert metric(metrics_port, "dnsmirror_dns_realtime") == 0
    assert "dns_priority" in log.read_text()


@pytest.mark.skipif(not realtime_allowed(), reason="real-time priority is not allowed here")
def test_the_dns_process_holds_real_time_priority_only_while_the_machine_is_busy(mirror):
    port, process, log = mirror
    pids = children(process.pid)

    def policies() -> set[int]:
        return {os.sched_getscheduler(child) for child in pids}

    with busy_machine():
        assert wait_until(lambda: policies() == {os.SCHED_RR}, 10), log.read_text()
        assert answer(port) == MIRROR
    # cores idle again: an ordinary task answers sooner there (woken where its query came from)
    assert wait_until(lambda: policies() == {os.SCHED_OTHER}, 10), log.read_text()
    assert answer(port) == MIRROR
    with busy_machine():
        assert wait_until(lambda: policies() == {os.SCHED_RR}, 10), log.read_text()
    assert children(process.pid) == pids


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="dropping CAP_SYS_NICE needs root"
)
@pytest.mark.skipif(nice_of(0) > 14, reason="this test already runs at a low priority")
def test_without_cap_sys_nice_the_mirror_process_lowers_its_own_priority(tmp_path):
    metrics_port = free_port()
    start = nice_of(0)
    with dnsmirror_serve(
        tmp_path,
        {
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            "log": {"format": "json"},
            "dns": {"upstreams": [f"127.0.0.1:{free_port()}"]},
        },
        # as in the DaemonSet's container: root without CAP_SYS_NICE
        prefix=("setpriv", "--bounding-set", "-sys_nice", "--"),
    ) as (_, process, log):
        assert wait_until(lambda: priority_settled(metrics_port, process.pid), 10), log.read_text()
        for child in children(process.pid):
            assert nice_of(child) == start
            if os.path.exists(f"/proc/{child}/autogroup"):  # its group kept its weight too
                assert Path(f"/proc/{child}/autogroup").read_text().split()[-1] == "0"
            assert os.sched_getscheduler(child) == os.SCHED_OTHER  # no real-time priority either
        # every thread of the mirror process: the disk threads' hashing and writing yield too
        threads = [int(tid) for tid in os.listdir(f"/proc/{process.pid}/task")]
        assert {nice_of(tid) for tid in threads} == {start + 5}
        assert metric(metrics_port, "dnsmirror_dns_realtime") == 0
    records = [json.loads(line) for line in log.read_text().splitlines() if '"dns_priority"' in line]
    assert records and records[0]["mirror_lowered_by"] == 5 and records[0]["dns_nice"] == start
    assert all(record["mirror_lowered_by"] == 0 for record in records[1:])  # once is enough for all


_OVERRUN = """
import os, time
from twisted.internet import task
from dnsmirror.dns.child import _Realtime
from dnsmirror.dns.priority import MachineLoad
clock = task.Clock()
realtime = _Realtime(clock, load=MachineLoad((float("inf"), float("inf"))))  # a machine always busy
realtime.start()
print(os.sched_getscheduler(0) == os.SCHED_RR, realtime.enabled)
deadline = time.monotonic() + 3
while realtime.enabled and time.monotonic() < deadline:
    pass  # a loop that never waits: the kernel sends SIGXCPU after 0.2 s of it
print(os.sched_getscheduler(0) == os.SCHED_OTHER, realtime.enabled)
realtime.check()  # still cooling down
print(os.sched_getscheduler(0) == os.SCHED_OTHER)
clock.advance(6)
realtime.check()  # first check after the cool-down: one measured interval
clock.advance(0.5)
realtime.check()
print(os.sched_getscheduler(0) == os.SCHED_RR, realtime.enabled)
"""


@pytest.mark.skipif(not realtime_allowed(), reason="real-time priority is not allowed here")
def test_a_real_time_dns_process_that_never_waits_is_made_an_ordinary_task_by_the_kernel_then_restored():
    done = subprocess.run([sys.executable, "-c", _OVERRUN], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True", "False", "True", "True", "True"], done.stderr
    assert "without waiting" in done.stderr


_FLOOD = """
import socket, sys, time
from dnslib import DNSRecord
port, seconds, name = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
packet = DNSRecord.question(name).pack()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setblocking(False)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(64):
        try:
            sock.sendto(packet, ("127.0.0.1", port))
        except BlockingIOError:
            pass
"""


@pytest.mark.skipif(not realtime_allowed(), reason="real-time priority is not allowed here")
def test_a_query_flood_takes_the_dns_process_off_real_time_priority_for_a_while(mirror):
    port, process, log = mirror
    pids = children(process.pid)

    def demoted() -> bool:
        return os.SCHED_OTHER in {os.sched_getscheduler(child) for child in pids}

    with busy_machine():  # real-time priority is held on a busy machine only
        assert wait_until(lambda: not demoted(), 10), log.read_text()
        flood = subprocess.Popen([sys.executable, "-c", _FLOOD, str(port), "6", ECR])
        try:
            # over its CPU share, or 0.2 s without waiting: an ordinary task, so the flood cannot take a core
            assert wait_until(demoted, 5), log.read_text()
        finally:
            flood.kill()
            flood.wait()
        text = log.read_text()
        assert "of a core: at its nice value" in text or "without waiting: at its nice value" in text, text
        assert answer(port) == MIRROR
        # the cool-down over, a quiet resolver takes its priority again
        assert wait_until(lambda: not demoted(), 10), log.read_text()
    assert children(process.pid) == pids  # demoted, never killed


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("cpu_priority", 20, "between 0 and 19"), ("cpu_priority", "high", "expected an integer"),
     ("realtime", "sometimes", "expected true or false"), ("processes", 0, "between 1 and 64")],
)
def test_a_bad_cpu_priority_realtime_or_processes_is_a_config_error_naming_the_key(tmp_path, key, value,
                                                                                    message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"dns:\n  {key}: {value}\n")
    done = subprocess.run([sys.executable, "-m", "dnsmirror", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"dns.{key}" in done.stderr and message in done.stderr, done.stderr
