"""The pull mirror's promises, one by one, with real components and raw HTTPS clients on the node.

One module-wide world (created once, shared by the tests):

- ``registry`` namespace: Debian's docker-registry for ``ECR_HOST`` (anonymous pulls), with its egress
  capped at :data:`UPSTREAM_RATE` once the test blobs are uploaded, so that a blob takes a second or two
  to arrive and tests can act while a fill is under way; unbound there is the world's DNS.
- ``private`` namespace: docker-registry for ``ECR_HOST_2`` with *token* auth (the registry checks a
  signed JWT's per-repository grants, so two credentials genuinely see different repositories) and the
  ``redirect`` storage middleware: every blob GET answers 307 to :data:`BLOB_HOST`.
- ``cdn`` namespace: :class:`~harness.blobhost.BlobHost` serving the private registry's storage as
  :data:`BLOB_HOST`, logging whether each request carried an ``Authorization`` header; its egress is
  capped like the public registry's, so private fills also last long enough to be joined.
- ``node`` namespace: ``dnsmirror serve`` (DNS + HTTPS). The clients are Python TLS sockets opened in
  that namespace, verifying dnsmirror's leaves with the node's trust bundle, so every byte the tests
  read went through dnsmirror's TLS listener.

Tokens are minted by the test itself (ES256 JWTs whose ``x5c`` leaf chains to a root the private
registry trusts), which is what a token server would hand out after a login; nothing in the test
contacts the ``realm``.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from dns_support import wait_until
from harness import ECR_HOST, ECR_HOST_2, require_netns
from harness.blobhost import BlobHost
from harness.netns import Cluster, Namespace
from harness.pki import TestCA, create_ca
from harness.registry import Registry
from mirror_support import MirrorNode, upstream_dns

pytestmark = pytest.mark.integration

PUBLIC_REPOSITORY = "team/blobs"
PRIVATE_A = "private/a"
PRIVATE_B = "private/b"
BLOB_HOST = "layers.blobstore.example"  # object-storage stand-in: resolved by the world's DNS, never captured
UPSTREAM_RATE = "16mbit"  # ~2 MB/s: a 4 MiB blob takes ~2 s to fill
TOKEN_SERVICE = ECR_HOST_2
TOKEN_ISSUER = "dnsmirror-test-token-issuer"
TIMEOUT = 30


# --- blobs and tokens ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestBlob:
    """Random bytes and their digest."""

    __test__ = False

    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)


def random_blob(size: int) -> TestBlob:
    return TestBlob(os.urandom(size))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class TokenIssuer:
    """Mints registry bearer tokens (what a token server returns after a login), signed ES256 by a leaf
    whose root is the private registry's ``rootcertbundle``."""

    root: TestCA
    leaf_der: bytes
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, directory: Path) -> TokenIssuer:
        root = create_ca(directory / "root", common_name="dnsmirror test token root")
        leaf = root.issue_server(["token-signer.invalid"], directory / "signer")
        key = serialization.load_pem_private_key(leaf.key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(root, leaf.certificate.public_bytes(serialization.Encoding.DER), key)

    def token(self, subject: str, pulls: list[str], actions: tuple[str, ...] = ("pull",)) -> str:
        """A bearer token for ``subject`` allowed ``actions`` (pull) on exactly the repositories ``pulls``."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.leaf_der).decode("ascii")]}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "iat": now,
            "nbf": now - 60,
            "exp": now + 3600,
            "jti": os.urandom(8).hex(),
            "access": [{"type": "repository", "name": name, "actions": list(actions)} for name in pulls],
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def registry_auth(self) -> dict[str, object]:
        """docker-registry's ``auth`` section for these tokens."""
        return {"token": {"realm": "https://auth.blobstore.example/token", "service": TOKEN_SERVICE,
                          "issuer": TOKEN_ISSUER, "rootcertbundle": str(self.root.cert_path)}}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- raw HTTPS clients in a namespace --------------------------------------------------------------------


@dataclass
class Fetched:
    """A response as a client saw it; ``cut`` says why the body ended early (None: complete)."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes
    cut: str | None = None


def tls_socket(namespace: Namespace, address: str, server_name: str, trust: Path) -> ssl.SSLSocket:
    """A verified TLS connection from ``namespace`` to ``address:443`` with SNI ``server_name``."""
    raw = namespace.call(socket.create_connection, (address, 443), TIMEOUT)
    context = ssl.create_default_context(cafile=str(trust))
    return context.wrap_socket(raw, server_hostname=server_name)


def send_request(namespace: Namespace, address: str, trust: Path, path: str, *, sni: str = ECR_HOST,
                 host: str | None = ECR_HOST, headers: dict[str, str] | None = None,
                 method: str = "GET") -> http.client.HTTPConnection:
    """Send one request on a fresh connection (``host=None``: no Host header at all); its response is
    ``connection.getresponse()``."""
    connection = http.client.HTTPConnection(sni, 443, timeout=TIMEOUT)
    connection.sock = tls_socket(namespace, address, sni, trust)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    if host is not None:
        connection.putheader("Host", host)
    for name, value in (headers or {}).items():
        connection.putheader(name, value)
    connection.endheaders()
    return connection


def send(namespace: Namespace, address: str, trust: Path, path: str, *, sni: str = ECR_HOST,
         host: str | None = ECR_HOST, headers: dict[str, str] | None = None,
         method: str = "GET") -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """:func:`send_request`, then wait for the response's status and headers (body unread)."""
    connection = send_request(
        namespace, address, trust, path, sni=sni, host=host, headers=headers, method=method
    )
    return connection, connection.getresponse()


def read_body(response: http.client.HTTPResponse, limit: int | None = None) -> tuple[bytes, str | None]:
    """Read the body (at most ``limit`` bytes); return it and why it was cut short, if it was."""
    chunks: list[bytes] = []
    received = 0
    try:
        while limit is None or received < limit:
            chunk = response.read(65536 if limit is None else min(65536, limit - received))
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
    except http.client.IncompleteRead as error:
        chunks.append(error.partial)
        return b"".join(chunks), f"incomplete read: {error!r}"
    except (OSError, ssl.SSLError) as error:
        return b"".join(chunks), f"connection error: {error!r}"
    if limit is None and response.length:
        # http.client's read(amt) returns b"" at a premature end instead of raising
        return b"".join(chunks), f"connection closed {response.length} bytes before the end"
    return b"".join(chunks), None


def reset(connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
    """Close a client connection abruptly (RST), as a killed process would."""
    sock = connection.sock
    assert sock is not None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    response.close()  # the response's file holds a reference: the descriptor closes only with both gone
    connection.close()
    assert sock.fileno() == -1


# --- the world ---------------------------------------------------------------------------------------------


@dataclass
class World:
    cluster: Cluster
    ca: TestCA
    public: Registry
    private: Registry
    blob_host: BlobHost
    mirror: MirrorNode
    node: Namespace
    tokens: TokenIssuer
    trust: Path  # the node's trust bundle: the public CA and dnsmirror's root
    blobs: dict[str, TestBlob] = field(default_factory=dict)

    def fetch(self, path: str, *, sni: str = ECR_HOST, host: str | None = ECR_HOST,
              headers: dict[str, str] | None = None, method: str = "GET") -> Fetched:
        """One request through dnsmirror, body read to its end (or to where it was cut)."""
        connection, response = self.open(path, sni=sni, host=host, headers=headers, method=method)
        try:
            body, cut = read_body(response)
            return Fetched(response.status, response.msg, body, cut)
        finally:
            connection.close()

    def open(self, path: str, *, sni: str = ECR_HOST, host: str | None = ECR_HOST,
             headers: dict[str, str] | None = None,
             method: str = "GET") -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One request through dnsmirror, body unread."""
        return send(self.node, self.mirror.address, self.trust, path, sni=sni, host=host, headers=headers,
                    method=method)

    def send(self, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPConnection:
        """One GET through dnsmirror, sent; the response not read yet."""
        return send_request(self.node, self.mirror.address, self.trust, path, headers=headers)

    def send_to(self, path: str, *, sni: str, host: str,
                headers: dict[str, str] | None = None) -> http.client.HTTPConnection:
        """:meth:`send` to another captured host."""
        return send_request(
            self.node, self.mirror.address, self.trust, path, sni=sni, host=host, headers=headers
        )

    def cache_file(self, digest: str) -> Path:
        hex_digest = digest.split(":", 1)[1]
        return self.mirror.workdir / "cache" / "blobs" / "sha256" / hex_digest[:2] / hex_digest

    def cached(self, digest: str) -> bool:
        return self.cache_file(digest).is_file()

    def temp_files(self, digest: str) -> list[Path]:
        """Fill temp files of ``digest`` (the store names them after its first 16 hex digits)."""
        return list((self.mirror.workdir / "cache" / "tmp").glob(digest.split(":", 1)[1][:16] + "*"))

    def public_gets(self, digest: str) -> int:
        return self.public.count_requests("GET", self.public.blob_path(PUBLIC_REPOSITORY, digest))

    def log(self) -> str:
        return self.mirror.log()


def upload(namespace: Namespace, registry: Registry, trust: Path, repository: str, blob: TestBlob) -> None:
    """Push one blob straight to ``registry`` (POST an upload, PUT its bytes), not through dnsmirror."""
    connection, response = send(namespace, registry.address, trust, f"/v2/{repository}/blobs/uploads/",
                                sni=registry.hostname, host=registry.hostname, method="POST",
                                headers={"Content-Length": "0"})
    response.read()
    connection.close()
    assert response.status == 202, response.status
    location = urllib.parse.urlsplit(response.getheader("Location"))
    separator = "&" if location.query else ""
    path = f"{location.path}?{location.query}{separator}digest={urllib.parse.quote(blob.digest)}"
    connection = http.client.HTTPConnection(registry.hostname, 443, timeout=TIMEOUT)
    connection.sock = tls_socket(namespace, registry.address, registry.hostname, trust)
    connection.request("PUT", path, body=blob.data,
                       headers={"Content-Type": "application/octet-stream", "Host": registry.hostname})
    done = connection.getresponse()
    done.read()
    connection.close()
    assert done.status == 201, done.status


PUBLIC_BLOBS = {
    "mismatch": 1024 * 1024,
    "ranges": 4 * 1024 * 1024,
    "concurrent": 2 * 1024 * 1024,
    "disconnect": 3 * 1024 * 1024,
    "cold-range": 1024 * 1024,
}
PRIVATE_BLOBS = {"redirected": 300 * 1024, "private": 3 * 1024 * 1024, "team-a": 1024}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_netns()
    work = tmp_path_factory.mktemp("mirror-behaviour")
    blobs = {name: random_blob(size) for name, size in {**PUBLIC_BLOBS, **PRIVATE_BLOBS}.items()}
    with Cluster() as cluster:
        public_ns, private_ns, cdn_ns = cluster.add("registry"), cluster.add("private"), cluster.add("cdn")
        node = cluster.add("node")
        ca = create_ca(work / "public-ca")
        tokens = TokenIssuer.create(work / "tokens")
        names = {ECR_HOST: public_ns.address, ECR_HOST_2: private_ns.address, BLOB_HOST: cdn_ns.address}
        public = Registry(public_ns, ECR_HOST, ca, work / "public")
        private = Registry(private_ns, ECR_HOST_2, ca, work / "private")
        with public, private, upstream_dns(public_ns, work / "dns", names) as dns:
            for name in PUBLIC_BLOBS:
                upload(node, public, ca.cert_path, PUBLIC_REPOSITORY, blobs[name])
            upload(node, private, ca.cert_path, PRIVATE_B, blobs["redirected"])
            upload(node, private, ca.cert_path, PRIVATE_B, blobs["private"])
            upload(node, private, ca.cert_path, PRIVATE_A, blobs["team-a"])
            # uploads done anonymously; from now on the private registry wants tokens and redirects blobs
            private.stop()
            private.extra_config = {"auth": tokens.registry_auth()}
            private.redirect_base_url = f"https://{BLOB_HOST}"
            private.start()
            public_ns.limit_egress(UPSTREAM_RATE)
            cdn_ns.limit_egress(UPSTREAM_RATE)
            with BlobHost(cdn_ns, BLOB_HOST, ca, private.storage_dir, work / "cdn") as blob_host, \
                    MirrorNode(node, work / "mirror", dns, ca) as mirror:
                yield World(
                    cluster,
                    ca,
                    public,
                    private,
                    blob_host,
                    mirror,
                    node,
                    tokens,
                    mirror.trust_bundle(),
                    blobs,
                )


# --- the tests ---------------------------------------------------------------------------------------------


def test_digest_mismatch_aborts_every_stream_and_caches_nothing(world: World) -> None:
    blob = world.blobs["mismatch"]
    path = world.public.blob_path(PUBLIC_REPOSITORY, blob.digest)
    world.public.corrupt_blob(blob.digest)  # same size, wrong bytes
    for attempt in (1, 2):
        starter_connection, starter = world.open(path)
        head, cut = read_body(starter, 8 * 1024)
        assert cut is None and len(head) == 8 * 1024
        # while the fill runs: a second full reader, and a range wholly inside the bytes already received
        joiner = world.send(path)
        ranged = world.send(path, {"Range": "bytes=100-199"})
        assert world.temp_files(blob.digest), "the fill ended before the other requests arrived"
        rest, cut = read_body(starter)
        starter_connection.close()
        assert starter.status == 200 and int(starter.getheader("Content-Length")) == blob.size
        # the client never receives a complete body: the last byte is held back until the digest is checked
        assert cut is not None and len(head + rest) < blob.size, (attempt, len(head + rest), world.log())
        for connection, status, length in ((joiner, 200, blob.size), (ranged, 206, 100)):
            response = connection.getresponse()
            body, cut = read_body(response)
            connection.close()
            assert (response.status, int(response.getheader("Content-Length"))) == (status, length)
            assert cut is not None and len(body) < length, (attempt, status, len(body), world.log())
        assert world.public_gets(blob.digest) == attempt  # a failed fill is not remembered: it tries again
        assert wait_until(lambda: not world.temp_files(blob.digest), 10), world.temp_files(blob.digest)
        assert not world.cached(blob.digest)
    world.public.corrupt_blob(blob.digest)  # flipping the bytes again restores them
    got = world.fetch(path)
    assert (got.status, got.cut, got.body == blob.data) == (200, None, True)
    assert world.public_gets(blob.digest) == 3
    assert wait_until(lambda: world.cached(blob.digest), 10)
    assert world.cache_file(blob.digest).read_bytes() == blob.data


def test_range_requests_while_filling_and_after(world: World) -> None:
    blob = world.blobs["ranges"]
    path = world.public.blob_path(PUBLIC_REPOSITORY, blob.digest)
    full_connection, full_response = world.open(path)
    first, cut = read_body(full_response, 256 * 1024)
    assert cut is None and first == blob.data[: len(first)]
    # [start, end] inclusive, end None for an open range; behind the fill, across its edge, ahead of it
    spans = [(1000, 1999), (1_000_000, None), (3_000_000, 3_100_000), (blob.size - 10, None)]
    connections = []
    for start, end in spans:
        connections.append(world.send(path, {"Range": f"bytes={start}-{'' if end is None else end}"}))
    # every range request reached dnsmirror before the blob was committed: they are served from the fill
    # (a response's headers leave with its first byte, so ranges ahead of the fill answer later)
    assert not world.cached(blob.digest), "the fill ended before the ranges were asked; slow the upstream"
    for (start, end), connection in zip(spans, connections, strict=True):
        response = connection.getresponse()
        last = blob.size - 1 if end is None else end
        assert response.status == 206, (start, end, response.status)
        assert response.getheader("Content-Range") == f"bytes {start}-{last}/{blob.size}"
        assert int(response.getheader("Content-Length")) == last - start + 1
        body, cut = read_body(response)
        connection.close()
        assert cut is None and body == blob.data[start:last + 1], (start, end, cut, len(body))
    rest, cut = read_body(full_response)
    full_connection.close()
    assert cut is None and first + rest == blob.data
    assert wait_until(lambda: world.cached(blob.digest), 10)
    for start, end in [(2_000_000, None), (5, 4_000_000), (blob.size - 1, blob.size - 1)]:
        header = f"bytes={start}-" if end is None else f"bytes={start}-{end}"
        got = world.fetch(path, headers={"Range": header})
        last = blob.size - 1 if end is None else end
        assert got.status == 206 and got.headers["Content-Range"] == f"bytes {start}-{last}/{blob.size}"
        assert got.cut is None and got.body == blob.data[start:last + 1]
    assert world.public_gets(blob.digest) == 1


def test_a_range_request_for_a_cold_blob_fills_the_whole_blob(world: World) -> None:
    """containerd resuming a cut download after the cache lost the blob: the first request is a range."""
    blob = world.blobs["cold-range"]
    path = world.public.blob_path(PUBLIC_REPOSITORY, blob.digest)
    start = blob.size // 3
    got = world.fetch(path, headers={"Range": f"bytes={start}-"})
    assert (got.status, got.headers["Content-Range"]) == (206, f"bytes {start}-{blob.size - 1}/{blob.size}")
    assert got.cut is None and got.body == blob.data[start:]
    assert wait_until(lambda: world.cached(blob.digest), 10)
    assert world.cache_file(blob.digest).read_bytes() == blob.data
    whole = world.fetch(path)
    assert (whole.status, whole.body == blob.data) == (200, True)
    assert world.public_gets(blob.digest) == 1


def test_twenty_concurrent_cold_gets_make_one_upstream_get(world: World) -> None:
    blob = world.blobs["concurrent"]
    path = world.public.blob_path(PUBLIC_REPOSITORY, blob.digest)
    clients = 20
    # connected and TLS-established first, so that the 20 requests leave together
    sockets = [tls_socket(world.node, world.mirror.address, ECR_HOST, world.trust)
               for _ in range(clients)]
    barrier = threading.Barrier(clients, timeout=TIMEOUT)
    results: list[Fetched | BaseException | None] = [None] * clients

    def pull(index: int) -> None:
        connection = http.client.HTTPConnection(ECR_HOST, 443, timeout=TIMEOUT)
        connection.sock = sockets[index]
        try:
            barrier.wait()
            connection.request("GET", path)
            response = connection.getresponse()
            body, cut = read_body(response)
            results[index] = Fetched(response.status, response.msg, body, cut)
        except BaseException as error:  # noqa: BLE001 - reported by the assertions below
            results[index] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=pull, args=(index,), daemon=True) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    for index, result in enumerate(results):
        assert isinstance(result, Fetched), (index, result)
        assert (result.status, result.cut, len(result.body)) == (200, None, blob.size), (index, world.log())
        assert result.body == blob.data
    assert world.public_gets(blob.digest) == 1, world.public.access_log()
    assert wait_until(lambda: world.cached(blob.digest), 10)


def test_a_client_leaving_mid_fill_does_not_cancel_it_for_others(world: World) -> None:
    blob = world.blobs["disconnect"]
    path = world.public.blob_path(PUBLIC_REPOSITORY, blob.digest)
    leaver_connection, leaver = world.open(path)  # this request starts the fill
    head, cut = read_body(leaver, 8 * 1024)
    assert cut is None and head == blob.data[:8 * 1024]
    stayer_connection, stayer = world.open(path)
    start, cut = read_body(stayer, 8 * 1024)
    assert cut is None and start == blob.data[:8 * 1024]
    reset(leaver_connection, leaver)
    assert not world.cached(blob.digest), "the fill ended before the first client left; slow the upstream"
    rest, cut = read_body(stayer)
    stayer_connection.close()
    assert cut is None and start + rest == blob.data, (cut, len(start + rest), world.log())
    assert wait_until(lambda: world.cached(blob.digest), 10)
    assert world.public_gets(blob.digest) == 1
    again = world.fetch(path)
    assert (again.status, again.body == blob.data) == (200, True)
    assert world.public_gets(blob.digest) == 1
    failures = [
        line
        for line in world.mirror.process.stdout().splitlines() + world.mirror.process.stderr().splitlines()
        if '"fill_failed"' in line and blob.digest in line
    ]
    assert not failures


def test_redirected_blob_reaches_the_second_host_without_authorization(world: World) -> None:
    blob = world.blobs["redirected"]
    path = world.private.blob_path(PRIVATE_B, blob.digest)
    token = world.tokens.token("bob", [PRIVATE_B])
    got = world.fetch(path, sni=ECR_HOST_2, host=ECR_HOST_2, headers=bearer(token))
    assert (got.status, got.cut, got.body == blob.data) == (200, None, True), world.log()
    # the registry demands a valid token, so its 307 shows that the Authorization header reached it
    assert [entry.status for entry in world.private.access_log() if entry.path == path] == [307]
    hex_digest = blob.digest.split(":", 1)[1]
    storage_path = f"/docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
    at_blob_host = [
        entry for entry in world.blob_host.requests() if entry["path"].split("?")[0] == storage_path
    ]
    assert [(entry["method"], entry["host"], entry["status"]) for entry in at_blob_host] == [
        ("GET", BLOB_HOST, 200)]
    assert not any(entry["authorization"] for entry in at_blob_host)
    assert wait_until(lambda: world.cached(blob.digest), 10)


def test_private_blob_is_served_only_to_credentials_upstream_allows(world: World) -> None:
    """Token auth makes the registry's refusals real: bob, carol and dave may pull ``private/b``, alice
    only ``private/a``. Bob's pull fills the cache; every refusal upstream gives reaches the client as
    upstream gave it, both while the fill runs and once the blob is cached."""
    blob = world.blobs["private"]
    path = world.private.blob_path(PRIVATE_B, blob.digest)
    private_host = {"sni": ECR_HOST_2, "host": ECR_HOST_2}
    bob = world.tokens.token("bob", [PRIVATE_B])
    forged = TokenIssuer.create(world.mirror.workdir.parent / "forger").token("bob", [PRIVATE_B])
    alice = world.tokens.token("alice", [PRIVATE_A])
    in_private_a = world.private.blob_path(PRIVATE_A, blob.digest)
    refused = [
        ("anonymous", path, {}, 401),
        ("a forged token", path, bearer(forged), 401),
        ("alice, not allowed in private/b", path, bearer(alice), 401),
        # the digest is cached, but upstream has no such blob in alice's repository
        ("alice, in her own repository", in_private_a, bearer(alice), 404),
        # bob's token is for private/b only: his own fill of the digest does not open private/a to him
        ("bob, in private/a", in_private_a, bearer(bob), 401),
    ]

    def check_refusals(when: str) -> None:
        for who, asked, headers, status in refused:
            answer = world.fetch(asked, headers=headers, **private_host)
            assert answer.status == status, (when, who, answer.status, answer.body[:300])
            assert blob.data[:64] not in answer.body and len(answer.body) < 4096, (when, who)
            if status == 401:
                assert answer.headers["WWW-Authenticate"].startswith("Bearer realm="), (when, who)
            assert json.loads(answer.body)["errors"], (when, who)  # upstream's own error document

    bob_connection, bob_response = world.open(path, headers=bearer(bob), **private_host)
    head, cut = read_body(bob_response, 8 * 1024)
    assert (bob_response.status, cut) == (200, None)
    carol = world.send_to(path, headers=bearer(world.tokens.token("carol", [PRIVATE_B])), **private_host)
    check_refusals("while bob's fill runs")
    assert not world.cached(blob.digest), (
        "the fill ended before the refusals were checked; slow the blob host"
    )
    rest, cut = read_body(bob_response)
    bob_connection.close()
    assert cut is None and head + rest == blob.data, world.log()
    carol_response = carol.getresponse()
    body, cut = read_body(carol_response)
    carol.close()
    assert (carol_response.status, cut, body == blob.data) == (200, None, True)
    assert wait_until(lambda: world.cached(blob.digest), 10)

    check_refusals("from the cache")
    dave = world.tokens.token("dave", [PRIVATE_B])
    got = world.fetch(path, headers=bearer(dave), **private_host)
    assert (got.status, got.cut, got.body == blob.data) == (200, None, True), world.log()
    # one successful GET upstream (bob's fill, answered with the redirect); carol and dave were checked with
    # a HEAD, and read the bytes from the fill and from the cache
    assert world.private.count_requests("GET", path, status=307) == 1
    assert world.private.count_requests("HEAD", path, status=307) == 2
    hex_digest = blob.digest.split(":", 1)[1]
    at_blob_host = [entry for entry in world.blob_host.requests() if hex_digest in entry["path"]]
    assert sum(1 for entry in at_blob_host if entry["method"] == "GET") == 1
    # the access checks followed the redirect too, without the token
    assert sum(1 for entry in at_blob_host if entry["method"] == "HEAD") == 2
    assert not any(entry["authorization"] for entry in at_blob_host)


def test_sni_and_host_must_name_the_same_captured_registry(world: World) -> None:
    probe = f"/v2/{PUBLIC_REPOSITORY}/manifests/probe-{os.urandom(4).hex()}"

    def logged() -> int:
        return sum(1 for registry in (world.public, world.private) for entry in registry.access_log()
                   if entry.path == probe)

    cases = [
        ("Host names another captured registry", ECR_HOST_2, 421),
        ("Host names a registry that is not captured", "registry.example.org", 421),
        ("no Host header", None, 400),
    ]
    for what, host, status in cases:
        got = world.fetch(probe, host=host)
        assert got.status == status, (what, got.status, got.body[:300])
        assert got.headers["Content-Type"].startswith("application/json"), what
        errors = json.loads(got.body)["errors"]
        assert errors and errors[0]["code"] and errors[0]["message"], what
    # the same request with Host = SNI does reach upstream (which knows no such tag): the refusals above
    # were the mirror's own
    matching = world.fetch(probe, host=f"{ECR_HOST}:443")
    assert matching.status == 404, matching.body[:300]
    assert wait_until(lambda: logged() == 1, 5), world.public.access_log()[-5:]
    # a TLS server name that is not captured gets no certificate at all
    with pytest.raises(ssl.SSLError):
        tls_socket(world.node, world.mirror.address, "registry.example.org", world.trust)
    assert logged() == 1


def finish_body_then_get(
    connection: http.client.HTTPConnection, rest: bytes, host: str
) -> http.client.HTTPResponse:
    """Send the rest of an answered request's body, then ``GET /v2/`` on the same connection (body read)."""
    connection.send(rest)
    connection.putrequest("GET", "/v2/", skip_host=True, skip_accept_encoding=True)
    connection.putheader("Host", host)
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    return response


def test_a_refused_push_gets_upstreams_refusal_before_its_body_is_sent(world: World) -> None:
    """A 2 MiB upload without a token: the private registry refuses it at once. The client gets that 401,
    with its challenge, after sending only the first 64 KiB; the rest it then sends is read and dropped,
    and the same connection serves its next request."""
    body = os.urandom(2 * 1024 * 1024)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    connection = send_request(
        world.node,
        world.mirror.address,
        world.trust,
        f"/v2/{PRIVATE_B}/blobs/uploads/?digest={digest}",
        sni=ECR_HOST_2,
        host=ECR_HOST_2,
        method="POST",
        headers={"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"},
    )
    try:
        connection.send(body[:65536])
        connection.sock.settimeout(10)
        response = connection.getresponse()
        challenge = response.getheader("WWW-Authenticate", "")
        refusal = response.read()
        assert response.status == 401, (response.status, refusal[:300])
        assert challenge.startswith("Bearer ") and b"UNAUTHORIZED" in refusal

        again = finish_body_then_get(connection, body[65536:], ECR_HOST_2)
        assert again.status == 401 and again.getheader("WWW-Authenticate", "").startswith("Bearer ")
    finally:
        connection.close()


def test_a_push_to_an_unreachable_registry_gets_a_502_without_sending_its_body(world: World) -> None:
    """A captured name the world's DNS does not know: the upstream request fails at once, and a 4 MiB
    push learns it after 64 KiB instead of stalling once its first MiB is held for an upstream that never
    takes it."""
    nowhere = "999999999999.dkr.ecr.us-east-1.amazonaws.com"
    body = os.urandom(4 * 1024 * 1024)
    connection = send_request(
        world.node,
        world.mirror.address,
        world.trust,
        "/v2/team/app/blobs/uploads/",
        sni=nowhere,
        host=nowhere,
        method="POST",
        headers={"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"},
    )
    try:
        connection.send(body[:65536])
        connection.sock.settimeout(10)
        response = connection.getresponse()
        error = json.loads(response.read())
        assert response.status == 502 and error["errors"][0]["code"] == "UNAVAILABLE", error
        assert finish_body_then_get(connection, body[65536:], nowhere).status == 502
    finally:
        connection.close()


def test_bad_requests_get_clear_errors_and_break_nothing(world: World) -> None:
    """Huge headers, odd paths and bad digests get 4xx answers; the next request on a fresh connection
    works."""
    huge = world.fetch("/v2/", headers={"X-Padding": "x" * 70_000})
    assert 400 <= huge.status < 500
    for path, code in [
        (f"/v2/{PUBLIC_REPOSITORY}/blobs/sha256:not-hex", "DIGEST_INVALID"),
        (f"/v2/{PUBLIC_REPOSITORY}/blobs/md5:0123", "DIGEST_INVALID"),
        ("/v2/Upper/Case/manifests/v1", "NAME_INVALID"),
        (f"/v2/{PUBLIC_REPOSITORY}/../../etc/passwd/blobs/sha256:" + "0" * 64, "NAME_INVALID"),
        (f"/v2/{PUBLIC_REPOSITORY}%2f..%2fx/blobs/sha256:" + "0" * 64, "NAME_INVALID"),
    ]:
        got = world.fetch(path)
        assert got.status == 400, (path, got.status, got.body[:200])
        assert json.loads(got.body)["errors"][0]["code"] == code, path
    # still serving: a cached-or-fetched blob comes back whole
    blob = world.blobs["ranges"]
    got = world.fetch(f"/v2/{PUBLIC_REPOSITORY}/blobs/{blob.digest}")
    assert got.status == 200 and got.body == blob.data


def test_an_upstream_refusal_of_a_cold_read_leaves_no_cache_file(world: World) -> None:
    """The cache file of a cold read is created while upstream answers; a refusal removes it again."""
    missing = "sha256:" + hashlib.sha256(os.urandom(16)).hexdigest()
    for attempt in range(3):
        got = world.fetch(f"/v2/{PUBLIC_REPOSITORY}/blobs/{missing}")
        assert got.status == 404 and json.loads(got.body)["errors"], (attempt, got.status, got.body[:200])
    assert wait_until(lambda: world.temp_files(missing) == [], 10), world.temp_files(missing)
    assert not world.cached(missing)


def test_a_cache_that_cannot_create_files_still_serves_verified_bytes(world: World) -> None:
    """No cache file can be made (here its directory is gone): the blob streams uncached, verified."""
    blob = random_blob(256 * 1024)
    upload(world.node, world.public, world.ca.cert_path, PUBLIC_REPOSITORY, blob)
    temp_dir = world.mirror.workdir / "cache" / "tmp"
    shutil.rmtree(temp_dir)
    temp_dir.write_text("not a directory")
    try:
        got = world.fetch(f"/v2/{PUBLIC_REPOSITORY}/blobs/{blob.digest}")
    finally:
        temp_dir.unlink()
        temp_dir.mkdir()
    assert (got.status, got.cut, got.body == blob.data) == (200, None, True), world.log()
    assert not world.cached(blob.digest)
    again = world.fetch(f"/v2/{PUBLIC_REPOSITORY}/blobs/{blob.digest}")  # the cache works again at once
    assert (again.status, again.body == blob.data) == (200, True)
    assert wait_until(lambda: world.cached(blob.digest), 10)
