"""The descriptor budget, connection caps at accept, and the request header deadline (fake clock)."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from http.client import HTTPResponse

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import address, protocol, task
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http, server
from twisted.web import resource as web_resource

from dnsmirror import ca, config
from dnsmirror.limits import (
    KNOWN_FOR,
    OPENING_GRACE,
    SPARED_OPENING,
    ConnectionLimiter,
    ConnectionTable,
    ListenerCaps,
    NewConnectionRate,
    plan_budget,
    raise_descriptor_limit,
    with_header_deadline,
)
from dnsmirror.peer_tls import PeerTLS


def test_the_budget_keeps_a_reserve_for_what_each_connection_opens_and_a_share_for_the_dns():
    budget = plan_budget(256, 20)
    https, peers, metrics = (budget.caps(name) for name in ("https", "peers", "metrics"))
    assert budget.in_use + 32 + budget.reserve + https.total + peers.total + metrics.total == 256
    # every admitted connection busy at once still leaves the DNS its share
    busy = https.total * 4 + peers.total * 2 + metrics.total
    assert budget.limit - budget.in_use - 32 - busy >= budget.dns >= 32
    assert https.total > metrics.total >= 4
    assert 16 <= https.per_client <= https.total
    big = plan_budget(1 << 20, 20)
    assert big.caps("https").per_client == 4096 and big.caps("https").total > 100_000
    tiny = plan_budget(40, 20)  # less than nothing left: every listener still takes a few
    assert tiny.caps("https") == ListenerCaps(4, 4)
    assert "https 25 connections (16 per client address)" in budget.summary()


def test_one_address_is_held_to_its_cap_and_a_full_listener_makes_room_for_a_smaller_holder():
    table = ConnectionTable(ListenerCaps(total=6, per_client=4))
    for n in range(4):
        assert table.admit("10.0.0.9", 0) == (True, None)
        table.add("10.0.0.9", f"flood-{n}", 0)
    assert table.admit("10.0.0.9", 0) == (False, None)  # at its own cap
    for n in range(2):
        assert table.admit("10.0.0.8", 0) == (True, None)
        table.add("10.0.0.8", f"other-{n}", 0)
    # full: a newcomer takes the oldest connection of the biggest holder
    assert table.admit("10.0.0.1", 1) == (True, "flood-0")
    table.remove("flood-0")
    table.add("10.0.0.1", "pull-0", 1)
    assert table.admit("10.0.0.1", 1) == (True, "flood-1")
    table.remove("flood-1")
    table.add("10.0.0.1", "pull-1", 1)
    # now every holder has its fair share: nobody is evicted for a third connection
    assert table.admit("10.0.0.1", 1) == (False, None)
    table.remove("other-0")
    assert table.total == 5 and table.admit("10.0.0.1", 1) == (True, None)


def test_a_connection_serving_a_request_is_never_taken_and_fair_share_counts_idle_ones():
    table = ConnectionTable(ListenerCaps(total=5, per_client=5))
    table.add("10.0.0.9", "flood-0", 0)
    for n in range(4):
        table.add("10.0.0.1", f"pull-{n}", 0)
        table.mark(f"pull-{n}", True, 1)
    # the puller holds the most, but every one of them serves a request: a newcomer is refused
    assert table.admit("10.0.0.7", 2) == (False, None) and table.admit("10.0.0.9", 2) == (False, None)
    assert table.held("10.0.0.1") == 4 and table.busy["10.0.0.1"] == {f"pull-{n}" for n in range(4)}
    # requests done: their connections are idle again, behind the flood's, and may be taken
    for n in range(4):
        table.mark(f"pull-{n}", False, 3)
    assert list(table.idle["10.0.0.1"]) == [f"pull-{n}" for n in range(4)]
    assert table.admit("10.0.0.7", 4) == (True, "pull-0")
    table.mark("nobody", True, 4)  # an unknown connection changes nothing
    table.remove("pull-3")  # a closed connection gives its place back
    assert table.total == 4 and table.held("10.0.0.1") == 3 and table.admit("10.0.0.7", 4) == (True, None)


def test_an_address_that_sends_requests_takes_the_place_of_one_that_only_holds_sockets():
    table = ConnectionTable(ListenerCaps(total=4, per_client=4))
    table.add("10.0.0.1", "ping", 0)
    table.mark("ping", True, 0)  # the puller's first request: its address is known from now on
    table.add("10.0.0.9", "flood-0", 1)
    table.add("10.0.0.9", "flood-1", 1)
    table.add("10.0.0.1", "blob-0", 2)
    # one idle connection of its own against the flood's two: fair share would refuse, but the flood's
    # address never sent a request
    assert table.admit("10.0.0.1", 2) == (True, "flood-0")
    table.remove("flood-0")
    table.add("10.0.0.1", "blob-1", 2)
    # the puller now holds the most idle connections, but a newcomer may not take them while their TLS
    # handshakes run
    assert table.admit("10.0.0.5", 3) == (False, None)
    # a new connection that sent no request in OPENING_GRACE seconds is idle like any other
    assert table.admit("10.0.0.5", 2 + OPENING_GRACE) == (True, "blob-0")
    # an address is known for KNOWN_FOR seconds after its last request
    assert table.is_known("10.0.0.1", KNOWN_FOR - 1) and not table.is_known("10.0.0.1", KNOWN_FOR + 1)
    assert not table.is_known("10.0.0.9", 0)


def test_a_known_address_opening_more_connections_at_once_than_a_client_does_is_spared_none():
    table = ConnectionTable(ListenerCaps(total=SPARED_OPENING + 2, per_client=16))
    table.add("10.0.0.9", "ping", 0)
    table.mark("ping", True, 0)  # one request: the address is known
    for n in range(SPARED_OPENING):
        table.add("10.0.0.9", f"opening-{n}", 1)
    table.add("10.0.0.5", "other", 1)
    assert table.admit("10.0.0.5", 2) == (False, None)  # as many as a client opens at once: spared
    table.remove("other")
    table.add("10.0.0.9", "one-more", 1)
    assert table.admit("10.0.0.5", 2) == (True, "opening-0")  # more than that: a flood's


_STEPS = st.lists(
    st.tuples(st.sampled_from(["accept", "accept", "start", "finish", "close", "wait"]), st.integers(0, 3),
              st.integers(0, 40)),
    max_size=80,
)


@given(_STEPS)
@settings(max_examples=500, deadline=None)
def test_the_table_never_takes_a_busy_connection_and_keeps_its_caps(steps):
    """Random accepts, requests, closes and waits: the table's promises hold after every step."""
    table = ConnectionTable(ListenerCaps(total=6, per_client=4))
    now, serial, busy = 0.0, 0, set()
    for action, who, pick in steps:
        client = f"10.0.0.{who}"
        held = list(table.held_by)
        if action == "accept":
            idle_unknown = any(not table.is_known(other, now) for other in table.idle)
            admitted, victim = table.admit(client, now)
            assert victim is None or (admitted and victim not in busy)
            assert victim is None or table.held_by[victim].client != client
            assert not admitted or table.held(client) < 4
            # an address that sends requests always gets in while one that never did holds an idle one
            if table.is_known(client, now) and table.held(client) < 4 and idle_unknown:
                assert admitted
            if victim is not None:
                table.remove(victim)
            if admitted:
                serial += 1
                table.add(client, serial, now)
        elif action == "wait":
            now += pick
        elif held:
            connection = held[pick % len(held)]
            if action == "close":
                table.remove(connection)
                busy.discard(connection)
            else:
                table.mark(connection, action == "start", now)
                (busy.add if action == "start" else busy.discard)(connection)
        assert table.total <= 6
        clients = {held.client for held in table.held_by.values()}
        assert table.total == sum(table.held(address) for address in clients)
        assert {c for conns in table.busy.values() for c in conns} == busy


class _Echo(protocol.Protocol):
    pass


def _accept(limiter: ConnectionLimiter, host: str):
    connection = limiter.buildProtocol(address.IPv4Address("TCP", host, 40000))
    if connection is not None:
        connection.makeConnection(StringTransport())
    return connection


def test_the_limiter_refuses_at_accept_and_logs_once_per_period(caplog):
    clock = task.Clock()
    limiter = ConnectionLimiter(protocol.Factory.forProtocol(_Echo), ListenerCaps(total=8, per_client=3),
                                "https", clock)
    held = [_accept(limiter, "10.0.0.9") for _ in range(3)]
    assert all(held)
    refused = [_accept(limiter, "10.0.0.9") for _ in range(50)]
    assert refused == [None] * 50 and limiter.stats.refused == 50
    assert caplog.text.count("https listener refused") == 1 and "full (caps 8 in all, 3 per" in caplog.text
    clock.advance(11)
    assert _accept(limiter, "10.0.0.9") is None
    assert caplog.text.count("https listener refused") == 2 and "refused 1 connection" in caplog.text
    held[0].connectionLost(None)
    assert _accept(limiter, "10.0.0.9") is not None  # a closed connection gives its place back
    assert _accept(limiter, "10.0.0.2") is not None  # another client is not affected


def test_a_full_limiter_aborts_the_biggest_holders_oldest_connection():
    limiter = ConnectionLimiter(protocol.Factory.forProtocol(_Echo), ListenerCaps(total=4, per_client=4),
                                "https", task.Clock())
    flood = [_accept(limiter, "10.0.0.9") for _ in range(4)]
    pull = _accept(limiter, "10.0.0.1")
    assert pull is not None and flood[0].transport.disconnecting
    assert limiter.stats.evicted == 1 and limiter.table.total == 4


class _Pending(web_resource.Resource):
    """Answers ``/slow`` only when the test says so, like a download still streaming."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.waiting = []

    def render_GET(self, request):
        self.waiting.append(request)
        return server.NOT_DONE_YET


def test_a_full_limiter_takes_an_idle_connection_not_one_serving_a_request():
    pending = _Pending()
    site = server.Site(pending, timeout=None)
    site.protocol = with_header_deadline(http.HTTPChannel)
    limiter = ConnectionLimiter(site, ListenerCaps(total=5, per_client=5), "https", task.Clock())
    pulls = [_accept(limiter, "10.0.0.1") for _ in range(3)]
    for pull in pulls:
        pull.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(pending.waiting) == 3 and limiter.table.busy == {"10.0.0.1": set(pulls)}
    flood = [_accept(limiter, "10.0.0.9") for _ in range(2)]
    # the puller is the biggest holder, but its connections are downloads: a newcomer takes the flood's
    newcomer = _accept(limiter, "10.0.0.5")
    assert newcomer is not None and flood[0].transport.disconnecting
    assert not any(pull.transport.disconnecting for pull in pulls)
    assert _accept(limiter, "10.0.0.6") is None  # one idle connection left per holder: refused
    for request in pending.waiting:
        request.write(b"done")
        request.finish()
    # the downloads are over: their connections are idle, and a newcomer takes the oldest of them
    assert "10.0.0.1" not in limiter.table.busy and list(limiter.table.idle["10.0.0.1"]) == pulls
    assert _accept(limiter, "10.0.0.6") is not None and pulls[0].transport.disconnecting


class _TcpTransport(StringTransport):
    def setTcpNoDelay(self, enabled):
        pass


def test_the_new_connection_rate_allows_a_burst_then_its_rate_per_address():
    rate = NewConnectionRate(per_second=10, burst=5, max_clients=2)
    assert [rate.allow("10.0.0.1", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rate.allow("10.0.0.2", 0.0)  # another address has a bucket of its own
    assert not rate.allow("10.0.0.1", 0.05)  # half a token back
    assert rate.allow("10.0.0.1", 0.1) and not rate.allow("10.0.0.1", 0.1)
    assert [rate.allow("10.0.0.1", 10.0) for _ in range(6)] == [True] * 5 + [False]  # never above the burst
    rate.allow("10.0.0.3", 10.0)  # a third address: the least recently seen is forgotten
    assert rate.allow("10.0.0.2", 10.0)
    with pytest.raises(ValueError):
        NewConnectionRate(per_second=0, burst=5)


def test_a_flood_of_new_connections_from_one_address_is_refused_before_any_work(caplog):
    clock = task.Clock()
    built = []

    class Counting(protocol.Factory):
        def buildProtocol(self, addr):
            built.append(addr)
            return _Echo()

    limiter = ConnectionLimiter(Counting(), ListenerCaps(total=1000, per_client=1000), "peers", clock,
                                NewConnectionRate(per_second=20, burst=100))
    flood = [_accept(limiter, "10.0.0.66") for _ in range(300)]
    assert sum(connection is not None for connection in flood) == 100 and len(built) == 100
    # refused by the rate, not the caps (1,000): the wrapped factory built only what was admitted
    assert limiter.stats.refused == 200 and limiter.table.total == 100
    assert "peers listener refused" in caplog.text and "new connections" in caplog.text
    assert _accept(limiter, "10.0.0.7") is not None  # a peer at another address is not held back
    clock.advance(1)
    assert sum(_accept(limiter, "10.0.0.66") is not None for _ in range(30)) == 20


def test_the_http_channel_finds_the_limiters_connection_under_tls():
    site = server.Site(_Pending(), timeout=None)
    site.protocol = with_header_deadline(http.HTTPChannel)
    limiter = ConnectionLimiter(TLSMemoryBIOFactory(CertificateOptions(), False, site),
                                ListenerCaps(total=4, per_client=4), "https", task.Clock())
    limited = limiter.buildProtocol(address.IPv4Address("TCP", "10.0.0.1", 40000))
    limited.makeConnection(_TcpTransport())
    channel = limited.wrappedProtocol.wrappedProtocol
    assert isinstance(channel, http.HTTPChannel) and channel.transport is not limited
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # as the TLS layer passes it on
    assert limiter.table.busy == {"10.0.0.1": {limited}}


def test_the_peer_listeners_channel_finds_the_limiters_connection_under_peer_tls():
    # one wrapper deeper than the HTTPS listener: the watch that reports failed handshakes
    site = server.Site(_Pending(), timeout=None)
    site.protocol = with_header_deadline(http.HTTPChannel)
    limiter = ConnectionLimiter(PeerTLS(b"a-long-enough-cluster-secret").listening(site),
                                ListenerCaps(total=4, per_client=4), "peers", task.Clock())
    limited = limiter.buildProtocol(address.IPv4Address("TCP", "10.0.0.1", 40000))
    limited.makeConnection(_TcpTransport())
    channel = limited.wrappedProtocol.wrappedProtocol.wrappedProtocol
    assert isinstance(channel, http.HTTPChannel)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # as the TLS layer passes it on
    assert limiter.table.busy == {"10.0.0.1": {limited}}


class _Hello(web_resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


def _channel(clock: task.Clock):
    site = server.Site(_Hello(), timeout=None)
    site.protocol = with_header_deadline(http.HTTPChannel, deadline=20)
    channel = site.buildProtocol(address.IPv4Address("TCP", "10.0.0.1", 1))
    channel.callLater = clock.callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_a_header_sent_one_byte_at_a_time_is_cut_at_the_deadline():
    clock = task.Clock()
    channel, transport = _channel(clock)
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
        channel.dataReceived(bytes([byte]))
        clock.advance(1)  # each byte well within any idle timeout
        if clock.seconds() >= 20:
            break
    assert transport.disconnecting or getattr(transport, "aborted", False) or transport.disconnected


def test_an_idle_keepalive_connection_and_a_slow_body_are_not_cut_by_the_header_deadline():
    clock = task.Clock()
    channel, transport = _channel(clock)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"hello" in transport.value()
    clock.advance(60)  # idle between requests: the header deadline has not started
    assert not transport.disconnecting
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().count(b"hello") == 2
    channel.dataReceived(b"GET / HTTP/1.1\r\nHo")
    clock.advance(19)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting or getattr(transport, "aborted", False) or transport.disconnected


def test_the_soft_descriptor_limit_is_raised_to_the_hard_limit(caplog):
    caplog.set_level(logging.INFO, "dnsmirror.limits")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        limit = raise_descriptor_limit()
        assert limit.soft_before == min(256, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == limit.soft
        assert limit.soft == hard or hard == resource.RLIM_INFINITY
        assert "descriptor limit: soft" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit is needed (util-linux)")
def test_300_idle_connections_under_ulimit_256_leave_https_and_metrics_to_other_clients(tmp_path):
    """The issue's flood, on loopback: one address holds its cap; another still gets TLS and an answer."""
    authority = tmp_path / "ca"
    ca.init_directory(authority, config.load().capture)
    https_port, metrics_port = _free_port(), _free_port()
    config_path = tmp_path / "dnsmirror.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "dns": {
                    "listen": [f"127.0.0.1:{_free_port()}"],
                    "upstreams": [f"127.0.0.1:{_free_port()}"],
                    "ttl": 1,
                },
                "https": {"listen": [f"127.0.0.1:{https_port}"]},
                "tls": {"ca_cert": str(authority / "ca.crt"), "ca_key": str(authority / "ca.key")},
                "cache": {"dir": str(tmp_path / "cache")},
                "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
                "log": {"format": "json"},
            }
        )
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file, contextlib.ExitStack() as held:
        process = subprocess.Popen(
            [
                "prlimit",
                "--nofile=256:256",
                "--",
                sys.executable,
                "-m",
                "dnsmirror",
                "serve",
                "--config",
                str(config_path),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        held.callback(process.wait, 10)
        held.callback(process.send_signal, signal.SIGINT)
        deadline = time.monotonic() + 15
        while b"dnsmirror started" not in log_path.read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        flood = [held.enter_context(socket.create_connection(("127.0.0.1", https_port), timeout=5))
                 for _ in range(300)]
        time.sleep(0.5)
        closed = 0
        for sock in flood:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                closed += sock.recv(1) == b""
        assert 250 <= closed <= 300 - 16  # all but the address's cap were closed at accept

        context = ssl.create_default_context(cafile=str(authority / "root.crt"))
        with (
            socket.create_connection(
                ("127.0.0.1", https_port), timeout=10, source_address=("127.0.0.2", 0)
            ) as raw,
            context.wrap_socket(raw, server_hostname="ghcr.io") as tls_socket,
        ):
            tls_socket.sendall(b"GET /v2/ HTTP/1.1\r\nHost: ghcr.io\r\nConnection: close\r\n\r\n")
            response = HTTPResponse(tls_socket)
            response.begin()
            assert response.status == 502  # an answer: upstream (a silent port) cannot be resolved
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as raw:
            raw.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            metrics = b"".join(iter(lambda: raw.recv(65536), b""))
        refused = [
            line
            for line in metrics.decode().splitlines()
            if line.startswith("dnsmirror_https_connections_refused_total ")
        ]
        assert refused and float(refused[0].split()[1]) >= 250
        samples = [line.partition(" ") for line in metrics.decode().splitlines()]
        gauges = {name: float(value) for name, _, value in samples if name.startswith("dnsmirror_")}
        # the flood's address holds its cap, idle; the scrape itself is the one metrics connection serving
        assert gauges["dnsmirror_https_connections"] >= 16
        assert gauges["dnsmirror_https_connections_serving"] == 0
        assert gauges["dnsmirror_metrics_connections_serving"] == 1
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert [r for r in records if r.get("event") == "nofile_limit"][0]["soft"] == 256
    budget = [r for r in records if r.get("event") == "descriptor_budget"][0]
    assert gauges["dnsmirror_https_connections_cap"] == budget["https_connections"] > 16
    assert len([r for r in records if r.get("event") == "connections_refused"]) == 1  # once per period
