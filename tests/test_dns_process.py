"""``serve`` answers DNS in a process of its own: it keeps answering while the mirror part is stuck
(failing open once the mirror's word is stale), is restarted when it dies, and ends with its parent."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
from dns_support import capturing_mirror, dig, dig_answers, dnsmirror_serve, unbound, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("dig"), reason="dig is not installed (scripts/setup.sh installs it)"),
]

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
MIRROR = "10.96.0.53"
REAL = "192.0.2.99"


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            found += [int(child) for child in listing.read().split()]
    return found


def answer(port: int, name: str = ECR) -> str | None:
    answers = dig_answers(dig(port, name, timeout=1).stdout)
    return answers[0][3] if answers else None


@pytest.fixture
def mirror(tmp_path):
    """A healthy DNS-only dnsmirror forwarding to unbound; yields (port, parent process, log path)."""
    with (
        unbound(tmp_path, [f"{ECR}. 300 IN A {REAL}", "www.example.test. 300 IN A 192.0.2.10"]) as upstream,
        capturing_mirror(tmp_path, upstream, ECR, MIRROR) as running,
    ):
        yield running


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


def test_a_killed_dns_process_is_replaced(mirror):
    port, process, log = mirror
    (child,) = children(process.pid)
    os.kill(child, signal.SIGKILL)
    assert wait_until(lambda: answer(port) == MIRROR, 10), log.read_text()
    assert children(process.pid) != [child]
    assert "dns_process_restart" in log.read_text()


def test_the_dns_process_ends_with_the_mirror_process(mirror):
    _, process, _ = mirror
    (child,) = children(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
        with open(f"/proc/{child}/stat") as stat:
            if stat.read().split(")")[1].split()[0] == "Z":
                break  # ended; a zombie until init reaps it
        time.sleep(0.05)
    else:
        assert not os.path.exists(f"/proc/{child}"), "the DNS process outlived its parent"


def test_dns_own_process_false_answers_from_the_mirror_process(tmp_path):
    with (
        unbound(tmp_path, [f"{ECR}. 300 IN A {REAL}"]) as upstream,
        dnsmirror_serve(
            tmp_path, {"dns": {"upstreams": [f"127.0.0.1:{upstream}"], "own_process": False}}
        ) as (port, process, _),
    ):
        assert answer(port) == REAL  # not healthy: fails open
        assert children(process.pid) == []
