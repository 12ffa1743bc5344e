"""The lifecycle of :class:`~dnsmirror.app.Services` on a memory reactor: one child service per listener
and background task, the drain as the Deferred of ``stopService``, a bind error that closes what was
bound. The processes' signal handling and exit statuses are tested in test_shutdown.py and test_cli.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from dns_support import free_port
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock

from dnsmirror import ca, config
from dnsmirror.app import ListenError, Services
from dnsmirror.dns.server import DatagramListener
from dnsmirror.https import UnavailableResource

PATTERNS = ["*.dkr.ecr.*.amazonaws.com"]


class Reactor(MemoryReactorClock):
    """Keeps the DNS UDP listeners it reads (on real sockets), and refuses ``busy`` TCP ports."""

    def __init__(self, busy: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.busy = busy
        self.udp_listeners: list[DatagramListener] = []

    def addReader(self, reader) -> None:
        super().addReader(reader)
        if isinstance(reader, DatagramListener) and reader not in self.udp_listeners:
            self.udp_listeners.append(reader)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.busy:
            raise error.CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)

    def udp_listening(self) -> list[bool]:
        """For each DNS UDP listener started: is it still open and read."""
        return [not listener.closed and listener in self.readers for listener in self.udp_listeners]


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    ca.init_directory(directory, PATTERNS)
    return directory


def _services(ca_dir: Path, reactor: Reactor, dns_port: int | None = None, **sections) -> Services:
    # DNS binds real sockets (read through the memory reactor), on a free port
    dns = {"listen": [f"127.0.0.1:{dns_port or free_port()}"], "upstreams": ["127.0.0.1:5399"], "ttl": 5}
    document = {"dns": dns,
                "https": {"listen": ["127.0.0.1:8443"]}, "capture": PATTERNS,
                "tls": {"ca_cert": str(ca_dir / "ca.crt"), "ca_key": str(ca_dir / "ca.key")}, **sections}
    return Services(config.parse_document(document), reactor, web_site=UnavailableResource("test"))


def test_every_listener_and_task_is_a_child_service(ca_dir):
    services = _services(ca_dir, Reactor(), metrics={"listen": "127.0.0.1:9100"})
    services.start()
    names = [child.name for child in services]
    assert names == ["dns forwarder", "dns listener 0", "https listener", "CA watcher", "metrics listener",
                     "health probe"]
    assert all(child.running for child in services)
    services.stop()
    assert not any(child.running for child in services)


def test_stop_service_fails_open_at_once_and_closes_after_the_drain(ca_dir):
    reactor = Reactor()
    services = _services(ca_dir, reactor)
    services.start()
    services.health.set(True, "probe says so")
    draining = services.stopService()
    # captured names fail open at once, but every listener still serves clients holding an answer
    assert not services.responder.capture_enabled
    assert services.health.reason == "shutting down"
    assert reactor.udp_listening() == [True]
    assert services.getServiceNamed("https listener").running
    reactor.advance(5.9)  # dns.ttl + 1 s
    assert not draining.called
    reactor.advance(0.2)
    assert draining.called
    assert not any(child.running for child in services)
    assert reactor.udp_listening() == [False]
    assert services.health.reason == "HTTPS listener stopped"


def test_cancelling_the_drain_closes_everything_now(ca_dir):
    reactor = Reactor()
    services = _services(ca_dir, reactor)
    services.start()
    draining = services.stopService()
    draining.cancel()  # a second SIGTERM or SIGINT
    assert draining.called
    assert not any(child.running for child in services)
    assert reactor.udp_listening() == [False]
    reactor.advance(10)
    assert not reactor.getDelayedCalls()


def test_a_bind_error_names_the_key_and_closes_what_was_bound(ca_dir):
    reactor = Reactor(busy=(9100,))
    services = _services(ca_dir, reactor, metrics={"listen": "127.0.0.1:9100"})
    with pytest.raises(ListenError, match=r"metrics.listen: cannot listen on 127.0.0.1:9100"):
        services.start()
    assert not any(child.running for child in services)
    assert reactor.udp_listening() == [False]  # bound before the metrics listener failed, closed again
    assert not services.getServiceNamed("metrics listener").running


def test_a_dns_port_in_use_names_the_key_and_binds_nothing(ca_dir):
    reactor = Reactor()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        services = _services(ca_dir, reactor, dns_port=port)
        expected = rf"dns.listen\[0\]: cannot listen on 127.0.0.1:{port} \(UDP/TCP\): Address already in use"
        with pytest.raises(ListenError, match=expected):
            services.start()
    assert reactor.udp_listeners == []
    assert reactor.tcpServers == []
    assert not any(child.running for child in services)
