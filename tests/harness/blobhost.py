"""A second HTTPS host that registry blob GETs are redirected to (object storage / CDN stand-in).

Real registries answer a blob GET with a redirect to another host; dnsmirror must follow it and drop the
``Authorization`` header across hosts. Pair a :class:`~harness.registry.Registry` started with
``redirect_base_url=f"https://{blob_host_name}"`` (distribution's ``redirect`` storage middleware) with a
:class:`BlobHost` serving that registry's storage directory: the redirect paths are the storage layout
(``/docker/registry/v2/blobs/sha256/xx/<hex>/data``). Each request is logged as one JSON line with whether
it carried an ``Authorization`` header (never its value).

    blobs = BlobHost(storage_ns, "blobs.example-cdn.test", ca, registry.storage_dir, tmp / "blobs").start()
    assert all(not entry["authorization"] for entry in blobs.requests())

Run as a script (inside the namespace) it is the server itself, standard library only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # run as a script, the server needs none of the harness
    from .netns import Namespace, Process
    from .pki import TestCA


class BlobHost:
    """A TLS static file server for ``root`` on ``namespace.address:port``, named ``hostname``."""

    def __init__(self, namespace: Namespace, hostname: str, ca: TestCA, root: str | os.PathLike[str],
                 workdir: str | os.PathLike[str], *, port: int = 443, address: str | None = None) -> None:
        self.namespace = namespace
        self.hostname = hostname
        self.root = Path(root)
        self.address = address or namespace.address
        self.port = port
        self.tls = ca.issue_server([hostname], Path(workdir) / "tls", ip_addresses=[self.address])
        self.process: Process | None = None

    def start(self, timeout: float = 15) -> BlobHost:
        """Start the server in its namespace and wait until it listens."""
        argv = [sys.executable, __file__, self.address, str(self.port), str(self.tls.chain_path),
                str(self.tls.key_path), str(self.root)]
        self.process = self.namespace.start(argv, "blobhost")
        self.process.wait_listening(self.port, timeout)
        return self

    def stop(self) -> None:
        """Stop the server."""
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> BlobHost:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def requests(self) -> list[dict[str, Any]]:
        """Every request so far: ``{"method", "path", "host", "status", "authorization": bool, "range"}``."""
        if self.process is None:
            return []
        return [json.loads(line) for line in self.process.whole_lines() if line.startswith("{")]


def _serve(address: str, port: int, cert: str, key: str, root: str) -> None:
    """The server process: GET/HEAD of files under ``root``, one JSON line per request on stdout."""
    import http.server
    import shutil
    import ssl

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, with_body: bool) -> None:
            path = Path(root, self.path.split("?", 1)[0].lstrip("/")).resolve()
            inside = path.is_relative_to(Path(root).resolve())
            status = 200 if inside and path.is_file() else 404
            print(json.dumps({"method": self.command, "path": self.path, "host": self.headers.get("Host"),
                              "status": status, "authorization": "Authorization" in self.headers,
                              "range": self.headers.get("Range")}), flush=True)
            self.send_response(status)
            if status != 200:
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            if with_body:
                with open(path, "rb") as body:
                    shutil.copyfileobj(body, self.wfile, 1 << 20)

        def do_GET(self) -> None:
            self._answer(True)

        def do_HEAD(self) -> None:
            self._answer(False)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the JSON line above is the log

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer((address, port), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
