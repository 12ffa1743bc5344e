"""Who may read cached content: grants come only from upstream's answer for that digest in that repository.

The attack these tests close: team B pushes to its own repository a manifest whose ``subject``, ``blobs``,
``manifests``, ``layers`` or ``config`` names a digest D that only team A may read, reads that manifest
through the mirror, then asks for D in its own repository. Reading a manifest must not grant what it names:
D is served to team B only after upstream answered 200 to team B's own ``HEAD`` for D in that repository.
Fast, in-process: the pure decisions, the tag observation of the pass-through, and the content chain with
its disk calls run by hand (``ManualDisk``) and an upstream that answers when the test says so.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from fakes import BlobResponse as _Response
from fakes import FakeRequest, ManualDisk, OneBlobUpstream, registry_target
from twisted.internet import defer
from twisted.web.http_headers import Headers

from dnsmirror import oci
from dnsmirror.authz import Access, Grants, access_from_answer, credential_key, granted_by_answer
from dnsmirror.content import ContentChain
from dnsmirror.proxy import PassThrough
from dnsmirror.store import Store
from dnsmirror.tags import TagMemory
from dnsmirror.target import Target

HOST = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
TEAM_A, TEAM_B = credential_key(b"Bearer team-a"), credential_key(b"Bearer team-b")
REPO_A, REPO_B = "team-a/app", "team-b/x"
SECRET = os.urandom(4096)  # team A's private layer
D = "sha256:" + hashlib.sha256(SECRET).hexdigest()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def naming(field: str, digest: str = D) -> bytes:
    """A manifest team B could push to its own repository that names ``digest`` in ``field``."""
    descriptor = {"mediaType": "application/octet-stream", "digest": digest, "size": len(SECRET)}
    own = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "b" * 64, "size": 2}
    manifest: dict = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": own, "layers": []}
    if field in ("subject", "config"):
        manifest[field] = descriptor
    else:
        manifest[field] = [descriptor]
    if field == "manifests":
        manifest["mediaType"] = oci.OCI_INDEX
        del manifest["config"], manifest["layers"]
    return json.dumps(manifest).encode()


REFERENCE_FIELDS = ["subject", "blobs", "manifests", "layers", "config"]


# --- the pure decisions -----------------------------------------------------------------------------------


def test_only_a_200_grants_and_only_the_digest_the_answer_was_about():
    assert granted_by_answer(D, 200) == D
    assert granted_by_answer(D, 200, served_digest="sha256:" + "c" * 64) == D  # asked by digest: that digest
    for status in (201, 206, 301, 307, 401, 403, 404, 429, 500, 503):
        assert granted_by_answer(D, status) is None, status
    # asked by tag: the manifest served, nothing else
    assert granted_by_answer("v1", 200, served_digest=D) == D
    assert granted_by_answer("v1", 200) is None
    assert granted_by_answer("v1", 404, served_digest=D) is None
    # a header that is no digest this mirror serves grants nothing
    for header in ("", "junk", "sha256:short", "sha512:" + "a" * 128, "md5:" + "a" * 32):
        assert granted_by_answer("v1", 200, served_digest=header) is None, header


def test_what_an_authorisation_head_answer_means():
    assert access_from_answer(200) is Access.ALLOWED
    for status in (401, 403, 404, 400, 405, 301, 307, 206):
        assert access_from_answer(status) is Access.DENIED, status
    for status in (429, 500, 502, 503, 504):
        assert access_from_answer(status) is None, status  # says nothing about the credential: offline policy


# --- fakes ------------------------------------------------------------------------------------------------


class _Head:
    """An upstream answer to a HEAD."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.headers = Headers()
        self.length = 0

    def discard(self, limit=None):
        return defer.succeed(None)


class HeadUpstream:
    """Answers HEADs when the test fires them (``answer``); GETs with ``body``. Records every request."""

    def __init__(self, body: bytes = SECRET) -> None:
        self.body = body
        self.requests: list[tuple[str, str, dict]] = []
        self.pending: list[defer.Deferred] = []

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        self.requests.append((method, url, dict(headers or {})))
        if method == "HEAD":
            d: defer.Deferred = defer.Deferred()
            self.pending.append(d)
            return d
        return OneBlobUpstream(self.body).request(method, url, headers)

    def answer(self, code: int) -> None:
        self.pending.pop(0).callback(_Head(code))

    def heads(self) -> list[str]:
        return [url for method, url, _ in self.requests if method == "HEAD"]


class RecordingPassThrough:
    """Stands in for the pass-through: records what was forwarded and answers it with ``status``."""

    def __init__(self, status: int = 404) -> None:
        self.status = status
        self.forwarded: list[Target] = []

    async def forward(self, request, target: Target) -> None:
        self.forwarded.append(target)
        request.setResponseCode(self.status)
        request.finish()


class WholePeer:
    """A peer node that holds ``body`` and sends it whole; counts the lookups."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.asked = 0

    def available(self) -> bool:
        return True

    async def fetch(self, digest):
        self.asked += 1
        return "10.0.0.7:5001", _Response(self.body)

    def failed(self, peer, digest, reason) -> None:
        raise AssertionError(f"the peer failed: {reason}")

    def announce(self, digest) -> None:
        pass


def target(
    credential: str, repository: str, digest: str, *, manifest: bool = False, method: str = "GET"
) -> Target:
    return registry_target(
        f"/v2/{repository}/{'manifests' if manifest else 'blobs'}/{digest}",
        host=HOST,
        method=method,
        credential=credential,
        authorization=[b"Bearer x"],
    )


def put(store: Store, data: bytes, content_type: str = "application/octet-stream") -> str:
    digest = digest_of(data)
    with store.writer(digest, content_type=content_type, expected_size=len(data)) as writer:
        writer.write(data)
        writer.commit()
    return digest


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "cache", 10 * 2**20) as opened:
        yield opened


def chain_with(
    store: Store, upstream, passthrough=None, peers=None
) -> tuple[ContentChain, ManualDisk, Grants]:
    disk = ManualDisk(store)
    grants = Grants(300, 86400)
    chain = ContentChain(
        disk.reactor, disk, upstream, grants, passthrough or RecordingPassThrough(), peers=peers
    )
    return chain, disk, grants


def serve(
    chain: ContentChain, disk: ManualDisk, request_target: Target
) -> tuple[FakeRequest, defer.Deferred]:
    request = FakeRequest()
    served = defer.ensureDeferred(chain.serve(request, request_target))
    disk.drain()
    return request, served


# --- the content chain ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", REFERENCE_FIELDS)
def test_reading_a_cached_manifest_grants_nothing_it_names(store, field):
    """Team B reads its own manifest naming D from the cache; D, cached for team A, then needs team B's own
    HEAD, and upstream's 404 reaches team B (through the pass-through), never D's bytes."""
    manifest = naming(field)
    manifest_digest = put(store, manifest, oci.OCI_MANIFEST)
    put(store, SECRET)
    upstream, passthrough = HeadUpstream(), RecordingPassThrough(404)
    chain, disk, grants = chain_with(store, upstream, passthrough)
    grants.grant(TEAM_B, HOST, REPO_B, [manifest_digest], disk.reactor.seconds())  # upstream gave B the tag
    grants.grant(TEAM_A, HOST, REPO_A, [D], disk.reactor.seconds())

    read, _ = serve(chain, disk, target(TEAM_B, REPO_B, manifest_digest, manifest=True))
    assert read.finished and read.body == manifest and upstream.heads() == []
    assert not grants.is_fresh(TEAM_B, HOST, REPO_B, D, disk.reactor.seconds())

    for method in ("GET", "HEAD"):
        asked, served = serve(chain, disk, target(TEAM_B, REPO_B, D, method=method))
        assert upstream.heads() == [f"https://{HOST}/v2/{REPO_B}/blobs/{D}"], method
        upstream.answer(404)
        disk.drain()
        assert served.called and asked.finished and asked.code == 404, method
        assert SECRET[:64] not in asked.body, method
        assert passthrough.forwarded[-1].repository == REPO_B
        upstream.requests.clear()
    assert not grants.is_fresh(TEAM_B, HOST, REPO_B, D, disk.reactor.seconds())

    # team A still reads D from the cache, with no request upstream
    own, _ = serve(chain, disk, target(TEAM_A, REPO_A, D))
    assert own.finished and own.body == SECRET and own.source == "cache" and upstream.requests == []


def test_a_manifest_filled_from_upstream_grants_only_itself(store):
    manifest = naming("layers")
    manifest_digest = digest_of(manifest)
    put(store, SECRET)
    upstream = HeadUpstream(body=manifest)
    chain, disk, grants = chain_with(store, upstream)
    read, _ = serve(chain, disk, target(TEAM_B, REPO_B, manifest_digest, manifest=True))
    disk.drain()
    assert read.body == manifest and manifest_digest in store
    now = disk.reactor.seconds()
    assert grants.is_fresh(TEAM_B, HOST, REPO_B, manifest_digest, now)
    assert not grants.is_fresh(TEAM_B, HOST, REPO_B, D, now)
    assert len(grants) == 1


def test_concurrent_reads_of_one_credential_share_one_authorisation_head(store):
    """A pull's parallel requests (and a client's retries) for one digest: one HEAD, one answer for all; other
    credentials and other repositories ask for themselves; the grant then serves without asking."""
    put(store, SECRET)
    upstream = HeadUpstream()
    chain, disk, grants = chain_with(store, upstream)
    first = [serve(chain, disk, target(TEAM_B, REPO_B, D)) for _ in range(3)]
    others = [serve(chain, disk, target(TEAM_A, REPO_B, D)), serve(chain, disk, target(TEAM_B, REPO_A, D))]
    assert upstream.heads() == [
        f"https://{HOST}/v2/{REPO_B}/blobs/{D}",
        f"https://{HOST}/v2/{REPO_B}/blobs/{D}",
        f"https://{HOST}/v2/{REPO_A}/blobs/{D}",
    ]
    assert chain.stats.access_checks == 3 and chain.stats.access_checks_merged == 2
    upstream.answer(200)
    disk.drain()
    for request, served in first:
        assert served.called and request.finished and request.body == SECRET
    upstream.answer(404)
    upstream.answer(401)
    disk.drain()
    assert not chain.checks  # nothing left under way
    assert [request.code for request, _ in others] == [404, 404]  # the pass-through's (recorded) answer
    assert not grants.is_fresh(TEAM_A, HOST, REPO_B, D, disk.reactor.seconds())
    assert not grants.is_fresh(TEAM_B, HOST, REPO_A, D, disk.reactor.seconds())

    again, _ = serve(chain, disk, target(TEAM_B, REPO_B, D))
    assert again.body == SECRET and len(upstream.heads()) == 3  # granted: no new HEAD
    disk.reactor.advance(301)  # cache.grant_ttl later: asked again
    later, _ = serve(chain, disk, target(TEAM_B, REPO_B, D))
    assert len(upstream.heads()) == 4 and not later.finished
    upstream.answer(200)
    disk.drain()
    assert later.body == SECRET


def test_an_unreachable_upstream_serves_only_an_earlier_answer_for_that_digest(store):
    """Offline policy: a credential upstream allowed D (in that repository) within offline_grant_ttl is
    served;
    one that only read a manifest naming D is not."""
    manifest_digest = put(store, naming("subject"), oci.OCI_MANIFEST)
    put(store, SECRET)
    upstream = HeadUpstream()
    chain, disk, grants = chain_with(store, upstream)
    grants.grant(TEAM_B, HOST, REPO_B, [manifest_digest], disk.reactor.seconds())
    grants.grant(TEAM_A, HOST, REPO_A, [D], disk.reactor.seconds())
    read, _ = serve(chain, disk, target(TEAM_B, REPO_B, manifest_digest, manifest=True))
    assert read.finished and upstream.heads() == []
    disk.reactor.advance(3600)  # past grant_ttl, within offline_grant_ttl
    b, _ = serve(chain, disk, target(TEAM_B, REPO_B, D))
    a, _ = serve(chain, disk, target(TEAM_A, REPO_A, D))
    upstream.answer(503)
    upstream.answer(503)
    disk.drain()
    assert b.code == 502 and SECRET[:64] not in b.body
    assert json.loads(b.body)["errors"][0]["code"] == "UNAVAILABLE"
    assert a.body == SECRET and chain.stats.offline_served == 1


def test_peers_are_asked_only_after_upstream_allowed_that_repository(store):
    """D is on another node: team B, having read its own manifest naming D, is refused by upstream, gets that
    refusal, and no peer is asked; team A's read fetches D from the peer and grants D in the repository the
    request named, and only there."""
    upstream, passthrough = HeadUpstream(), RecordingPassThrough(404)
    peer = WholePeer(SECRET)
    chain, disk, grants = chain_with(store, upstream, passthrough, peers=peer)
    manifest_digest = put(store, naming("blobs"), oci.OCI_MANIFEST)
    grants.grant(TEAM_B, HOST, REPO_B, [manifest_digest], disk.reactor.seconds())
    read, _ = serve(chain, disk, target(TEAM_B, REPO_B, manifest_digest, manifest=True))
    assert read.finished and upstream.heads() == []
    refused, served = serve(chain, disk, target(TEAM_B, REPO_B, D))
    upstream.answer(404)
    disk.drain()
    assert served.called and refused.code == 404 and peer.asked == 0 and D not in store

    allowed, served = serve(chain, disk, target(TEAM_A, REPO_A, D))
    upstream.answer(200)
    disk.drain()
    assert peer.asked == 1 and allowed.body == SECRET and allowed.source == "peer"
    now = disk.reactor.seconds()
    assert grants.is_fresh(TEAM_A, HOST, REPO_A, D, now)
    assert not any(grants.is_fresh(TEAM_A, HOST, repository, D, now) for repository in (REPO_B, ""))
    assert not grants.is_fresh(TEAM_B, HOST, REPO_B, D, now)
    assert passthrough.forwarded[0].repository == REPO_B


# --- the pass-through's tag observation -------------------------------------------------------------------


class _TagResponse:
    code, phrase = 200, b"OK"

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)
        self.headers = Headers(
            {
                b"content-type": [oci.OCI_MANIFEST.encode()],
                b"docker-content-digest": [digest_of(body).encode()],
            }
        )

    def read_body(self, limit):
        return defer.succeed(self.body)


class TagUpstream:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def request(self, method, url, headers=None, body_producer=None, *, follow_redirects=False):
        return defer.succeed(_TagResponse(self.body))


@pytest.mark.parametrize("field", REFERENCE_FIELDS)
def test_a_manifest_by_tag_grants_its_own_digest_and_nothing_it_names(store, field):
    manifest = naming(field)
    disk = ManualDisk(store)
    grants = Grants(300, 86400)
    passthrough = PassThrough(disk.reactor, TagUpstream(manifest), disk, grants, TagMemory(), stale_tags=True)
    tag_target = registry_target(
        f"/v2/{REPO_B}/manifests/v1", host=HOST, credential=TEAM_B, authorization=[b"Bearer x"]
    )
    request = FakeRequest({b"accept": [oci.OCI_MANIFEST.encode(), oci.OCI_INDEX.encode()]})
    defer.ensureDeferred(passthrough.forward(request, tag_target))
    disk.drain()
    assert request.finished and request.body == manifest
    now = disk.reactor.seconds()
    assert grants.is_fresh(TEAM_B, HOST, REPO_B, digest_of(manifest), now)
    assert not grants.is_fresh(TEAM_B, HOST, REPO_B, D, now) and len(grants) == 1
