"""TCP clients of the real DNS process: a client trickling bytes is cut at the message deadline, and
one address cannot hold more than its share of connections."""

from __future__ import annotations

import shutil
import socket
import struct
import time

import pytest
from dns_support import dnsmirror_serve
from dnslib import DNSRecord

from dnsmirror.dns.server import MAX_TCP_CONNECTIONS, MAX_TCP_CONNECTIONS_PER_CLIENT, DnsStreamProtocol

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("dig"), reason="dig is not installed (scripts/setup.sh installs it)"),
]


def closed_by_server(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_client_trickling_one_byte_at_a_time_is_cut_at_the_message_deadline(tmp_path):
    with dnsmirror_serve(tmp_path, {}) as (port, _, _):
        query = DNSRecord.question("www.example.test").pack()
        message = struct.pack("!H", len(query)) + query
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            cut = False
            for byte in message:
                client.sendall(bytes([byte]))
                if closed_by_server(client, 2.0):  # a byte every 2 s: idle never more than 2 s
                    cut = True
                    break
            elapsed = time.monotonic() - started
        assert cut, "the whole message went through"
        assert DnsStreamProtocol.message_timeout - 1 <= elapsed <= DnsStreamProtocol.message_timeout + 3, (
            elapsed
        )


def test_one_address_gets_its_share_of_connections_and_others_still_get_theirs(tmp_path):
    with dnsmirror_serve(tmp_path, {}) as (port, _, _):
        held = [
            socket.create_connection(("127.0.0.1", port), timeout=5)
            for _ in range(MAX_TCP_CONNECTIONS_PER_CLIENT)
        ]
        try:
            extra = socket.create_connection(("127.0.0.1", port), timeout=5)
            with extra:
                assert closed_by_server(extra, 3.0), "a connection beyond the per-address cap stayed open"
            # another client address (127.0.0.2) is still served, over TCP
            assert answered_over_tcp(port, "127.0.0.2")
        finally:
            for sock in held:
                sock.close()


def answered_over_tcp(port: int, source: str) -> bool:
    """Whether a query from ``source`` is answered over TCP (a status query: NOTIMP at once, nothing
    forwarded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as client:
        status = DNSRecord.question("x.invalid")
        status.header.opcode = 2
        packet = status.pack()
        client.settimeout(5)
        try:
            client.sendall(struct.pack("!H", len(packet)) + packet)
            length = struct.unpack("!H", client.recv(2))[0]
            return DNSRecord.parse(client.recv(length)).header.id == status.header.id
        except (OSError, struct.error):
            return False


FLOOD_ADDRESSES = 12


def test_idle_connections_from_many_addresses_leave_room_for_a_client_that_asks(tmp_path):
    """More idle connections than the listener holds, each address at its own cap: a newcomer still gets
    in (it takes an idle connection of the biggest holder) and is answered."""
    flood = []
    with dnsmirror_serve(tmp_path, {}) as (port, _, _):
        try:
            for n in range(FLOOD_ADDRESSES):
                for _ in range(MAX_TCP_CONNECTIONS_PER_CLIENT):
                    flood.append(socket.create_connection(("127.0.0.1", port), timeout=5,
                                                          source_address=(f"127.0.1.{n + 1}", 0)))
            assert len(flood) > MAX_TCP_CONNECTIONS
            time.sleep(0.5)  # every connection accepted (or closed) by now
            assert answered_over_tcp(port, "127.0.0.1")
            still_open = sum(not closed_by_server(sock, 0.01) for sock in flood)
            # the flood holds what is left, each address its even share or close to it
            assert MAX_TCP_CONNECTIONS - 2 <= still_open < MAX_TCP_CONNECTIONS
        finally:
            for sock in flood:
                sock.close()
