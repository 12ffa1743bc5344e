"""A misbehaving blob server: an upstream registry or a peer node that fails the way the fault table asks.

It serves ``GET /v2/<any>/blobs/<digest>`` (registry) and ``GET /peer/v1/blobs/<digest>`` (peer node) from
files named by the digest's hex in ``root``; ``root/modes.json`` maps a hex digest to what goes wrong
with it (re-read on each request, so a test sets a fault per blob):

- ``ok``: the blob; ``slow``: the blob in 16 KiB pieces 20 ms apart;
- ``stall_headers``: reads the request, answers nothing; ``stall_body``: the headers and half of the body,
  then nothing;
- ``error``: 503 with a registry error body; ``cut``: the headers, half the body, then the connection
  closes; ``die``: the same, but the process serving it is killed (``os._exit``) mid-body;
- ``corrupt``: the full length, one byte flipped in the middle.

A digest without a file is 404. Every request is one JSON line on stdout (``method``, ``path``,
``mode``). Each connection is served by its own forked process, and no stall lasts more than
:data:`STALL_LIMIT` seconds. With a certificate and key it serves TLS.

    faulty = FaultyServer(ns, tmp / "faulty", ca=ca, hostname="upstream.test").start()
    faulty.put(data, "cut")
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # run as a script, the server needs none of the harness
    from .netns import Namespace, Process
    from .pki import TestCA

STALL_LIMIT = 60.0


class FaultyServer:
    """The server on ``address:port`` in ``namespace`` (all its addresses when ``address`` is ``0.0.0.0``)."""

    def __init__(self, namespace: Namespace, workdir: str | os.PathLike[str], *, port: int = 443,
                 address: str | None = None, ca: TestCA | None = None, hostname: str | None = None) -> None:
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.root = self.workdir / "blobs"
        self.port = port
        self.address = address or namespace.address
        self.tls = ca.issue_server([hostname], self.workdir / "tls", ip_addresses=[namespace.address]) \
            if ca is not None and hostname else None
        self.process: Process | None = None

    def start(self, timeout: float = 15) -> FaultyServer:
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, __file__, self.address, str(self.port), str(self.root)]
        if self.tls is not None:
            argv += [str(self.tls.chain_path), str(self.tls.key_path)]
        self.process = self.namespace.start(argv, "faulty")
        self.process.wait_listening(self.port, timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> FaultyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def put(self, data: bytes, mode: str) -> str:
        """Serve ``data`` with fault ``mode``; returns its digest."""
        hex_digest = hashlib.sha256(data).hexdigest()
        (self.root / hex_digest).write_bytes(data)
        modes_path = self.root / "modes.json"
        modes = json.loads(modes_path.read_text()) if modes_path.exists() else {}
        modes[hex_digest] = mode
        temporary = modes_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(modes))
        os.replace(temporary, modes_path)
        return f"sha256:{hex_digest}"

    def requests(self) -> list[dict[str, Any]]:
        """Every request so far, oldest first."""
        if self.process is None:
            return []
        return [json.loads(line) for line in self.process.whole_lines() if line.startswith("{")]


def _serve(address: str, port: int, root: str, cert: str | None, key: str | None) -> None:
    import http.server
    import socketserver
    import ssl

    def mode_of(hex_digest: str) -> str:
        try:
            return json.loads(Path(root, "modes.json").read_text()).get(hex_digest, "ok")
        except (OSError, ValueError):
            return "ok"

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/v2/":
                self._reply(200, b"{}", "application/json")
                return
            digest = path.rsplit("/", 1)[-1]
            hex_digest = digest.removeprefix("sha256:")
            blob = Path(root, hex_digest)
            if "/blobs/" not in path or len(hex_digest) != 64 or not blob.is_file():
                print(json.dumps({"method": "GET", "path": path, "mode": None}), flush=True)
                self._reply(
                    404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}', "application/json"
                )
                return
            mode = mode_of(hex_digest)
            print(json.dumps({"method": "GET", "path": path, "mode": mode}), flush=True)
            data = blob.read_bytes()
            if mode == "stall_headers":
                time.sleep(STALL_LIMIT)
                return
            if mode == "error":
                self._reply(
                    503, b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}', "application/json"
                )
                return
            if mode == "corrupt":
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Docker-Content-Digest", digest)
            self.end_headers()
            half = len(data) // 2
            if mode in ("stall_body", "cut", "die"):
                self.wfile.write(data[:half])
                self.wfile.flush()
                if mode == "stall_body":
                    time.sleep(STALL_LIMIT)
                elif mode == "die":
                    os._exit(1)
                self.close_connection = True
                return
            if mode == "slow":
                for start in range(0, len(data), 16384):
                    self.wfile.write(data[start:start + 16384])
                    self.wfile.flush()
                    time.sleep(0.02)
                return
            self.wfile.write(data)

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the JSON line above is the log

    class Server(socketserver.ForkingMixIn, http.server.HTTPServer):
        block_on_close = False  # a stalled child must not hold up the server's own exit

    server = Server((address, port), Handler)
    if cert and key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.serve_forever()


if __name__ == "__main__":
    _serve(
        sys.argv[1], int(sys.argv[2]), sys.argv[3], *(sys.argv[4:6] if len(sys.argv) > 5 else (None, None))
    )
