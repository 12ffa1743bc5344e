"""Fault table, DNS rows: a dead, a refusing and a spoofing upstream resolver.

Each row asks the same question two ways, with real dig: through dnsmirror (``dns.upstreams`` =
[faulty, good]), and without it, as a stub resolver with the same two servers in resolv.conf would
(dig at the faulty one, then at the good one). It checks that the client gets what it would get
without dnsmirror, or better (the same answer, sooner), and never a forged record.

| fault                   | with dnsmirror                                   | without                     |
|-------------------------|--------------------------------------------------|-----------------------------|
| first upstream dead     | the answer; the first query may pay one timeout, | the answer after a timeout, |
|                         | later ones none (the dead one is skipped until   | every query                 |
|                         | it answers)                                      |                             |
| first upstream refusing | the answer at once, every query                  | the answer at once          |
| upstream spoofing       | the good upstream's answer (forgery dropped), or | dig drops the forgery and   |
| (right ID, other name)  | SERVFAIL when it is the only upstream            | times out                   |
"""

from __future__ import annotations

import shutil

import pytest
from dns_support import (
    FakeUpstream,
    dig,
    dig_answers,
    dig_status,
    dnsmirror_serve,
    refusing_port,
    silent_udp_server,
    timed_dig,
    unbound,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("dig"), reason="dig is not installed (scripts/setup.sh installs it)"),
]

NAME = "www.example.test"
GOOD = [(f"{NAME}.", 300, "A", "192.0.2.10")]
TIMEOUT = 1.0  # dns.timeout here; dig's own per-try timeout is 1 s too
FAST = 0.5  # well under one timeout


@pytest.fixture
def good_upstream(tmp_path):
    with unbound(tmp_path, [f"{NAME}. 300 IN A 192.0.2.10"]) as port:
        yield port


def without_mirror(ports: list[int], *options: str) -> tuple[float, list]:
    """What a stub resolver with ``ports`` in resolv.conf gets: the first answer, and the time it took."""
    spent = 0.0
    for port in ports:
        elapsed, result = timed_dig(port, NAME, *options, timeout=1)
        spent += elapsed
        if dig_status(result.stdout) == "NOERROR":
            return spent, dig_answers(result.stdout)
    return spent, []


def mirror_config(*ports: int, processes: int = 1) -> dict:
    return {"dns": {"upstreams": [f"127.0.0.1:{p}" for p in ports], "timeout": f"{int(TIMEOUT * 1000)}ms",
                    "processes": processes}}


@pytest.mark.parametrize(("transport", "processes"), [("udp", 1), ("tcp", 1), ("udp", 2), ("tcp", 2)])
def test_dead_first_upstream_costs_at_most_one_timeout(tmp_path, good_upstream, transport, processes):
    options = ("+tcp",) if transport == "tcp" else ()
    with (
        silent_udp_server() as dead,
        dnsmirror_serve(tmp_path, mirror_config(dead, good_upstream, processes=processes)) as (port, _, _),
    ):
        # TCP to the dead port is refused by the kernel, so "dead" over TCP means a silent UDP port only
        without_time, without_answers = without_mirror([dead, good_upstream], *options)
        assert without_answers == GOOD
        first_time, first = timed_dig(port, NAME, *options, timeout=4)
        assert dig_answers(first.stdout) == GOOD, first.stdout
        assert first_time < TIMEOUT + FAST
        # with two DNS processes, whichever reads a query: the one that paid told the other
        for _ in range(10):
            elapsed, result = timed_dig(port, NAME, *options)
            assert dig_answers(result.stdout) == GOOD, result.stdout
            assert elapsed < FAST, f"a query after the first paid the dead upstream's timeout: {elapsed:.2f}s"
        if transport == "udp":
            assert without_time >= TIMEOUT * 0.9  # without dnsmirror each query pays the timeout


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_refusing_first_upstream_moves_on_at_once(tmp_path, good_upstream, transport):
    options = ("+tcp",) if transport == "tcp" else ()
    refusing = refusing_port()
    with dnsmirror_serve(tmp_path, mirror_config(refusing, good_upstream)) as (port, _, _):
        _, without_answers = without_mirror([refusing, good_upstream], *options)
        assert without_answers == GOOD
        for _ in range(5):  # the first query too: a refusal is known at once
            elapsed, result = timed_dig(port, NAME, *options)
            assert dig_answers(result.stdout) == GOOD, result.stdout
            assert elapsed < FAST, f"a refusing upstream cost {elapsed:.2f}s"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_spoofing_upstream_is_never_believed(tmp_path, good_upstream, transport):
    options = ("+tcp",) if transport == "tcp" else ()
    with FakeUpstream(spoof=True) as spoofer:
        # without dnsmirror: dig itself drops an answer to another question
        direct = dig(spoofer.port, NAME, "A", *options, timeout=1)
        assert "6.6.6.6" not in "".join(a[3] for a in dig_answers(direct.stdout))
        with dnsmirror_serve(tmp_path, mirror_config(spoofer.port, good_upstream)) as (port, _, _):
            for _ in range(3):
                result = dig(port, NAME, "A", *options, timeout=4)
                assert dig_answers(result.stdout) == GOOD, result.stdout
                assert "6.6.6.6" not in result.stdout and "evil" not in result.stdout
            assert spoofer.queries >= 1  # it was asked, and its forgery was dropped
        with dnsmirror_serve(tmp_path, mirror_config(spoofer.port)) as (port, _, _):
            result = dig(port, NAME, "A", *options, timeout=4)
            assert dig_status(result.stdout) == "SERVFAIL", result.stdout
            assert "6.6.6.6" not in result.stdout
