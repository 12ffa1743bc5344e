"""Cached private blobs stay private when a manifest names them: end to end with docker-registry and tokens.

The world: Debian's docker-registry with *token* auth (the test mints the JWTs a token server would hand
out, as in ``test_mirror_behaviour``), so each team's token opens only its own repository; two dnsmirror
nodes that are peers of each other.

The attack: team A pulls its private layer D through node A, so D is cached there. Team B pushes to its OWN
repository a manifest that names D (as ``subject``, in ``blobs``, in ``manifests``, as a layer), reads that
manifest through the mirror, then asks for D in its own repository: from node A (D in the local cache) and
from node B (D on a peer). The registry itself answers team B 404 there; through dnsmirror team B must get
exactly that, for GET, HEAD and Range, and no peer may be asked. docker-registry accepts the ``subject``,
the ``blobs`` field and a layer with ``urls``; it refuses an index naming D, an image manifest carrying
``manifests``, an artifact manifest and a plain layer it does not hold in that repository: the test shows
each refusal, and that nothing was granted either.

Last, the price: a warm pull of a multi-layer image with a new token costs one authorisation HEAD per
manifest and blob read by digest (counted in the registry's access log), and concurrent reads of one digest
by one credential share one HEAD.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dns_support import wait_until
from harness import ECR_HOST, require_netns
from harness.netns import Cluster, Namespace
from harness.pki import TestCA, create_ca
from harness.registry import Registry
from mirror_support import MirrorNode, upstream_dns
from test_mirror_behaviour import TIMEOUT, Fetched, TokenIssuer, read_body, tls_socket
from test_peers_e2e import metric, peer_overrides, write_secret

from dnsmirror import oci

pytestmark = pytest.mark.integration

TEAM_A, TEAM_B = "team-a/app", "team-b/x"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
ARTIFACT_MANIFEST = "application/vnd.oci.artifact.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(data: bytes, media_type: str = OCI_LAYER) -> dict:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


@dataclass
class World:
    cluster: Cluster
    ca: TestCA
    registry: Registry
    tokens: TokenIssuer
    node_a: Namespace
    node_b: Namespace
    mirror_a: MirrorNode
    mirror_b: MirrorNode
    secret: bytes        # team A's private layer D, cached on node A
    own_config: bytes    # team B's own config and layer, for manifests the registry accepts
    own_layer: bytes
    trust: dict[str, Path] = field(default_factory=dict)  # each node's trust bundle, written once

    def token(self, team: str, *actions: str) -> dict[str, str]:
        repository = TEAM_A if team == "a" else TEAM_B
        return {"Authorization": f"Bearer {self.tokens.token(team, [repository], actions or ('pull',))}"}

    def call(self, via: str, method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> Fetched:
        """One request to the registry itself (``via="registry"``) or through node A's or B's dnsmirror."""
        namespace, address, trust = {
            "registry": (self.node_a, self.registry.address, self.ca.cert_path),
            "a": (self.node_a, self.mirror_a.address, self.trust["a"]),
            "b": (self.node_b, self.mirror_b.address, self.trust["b"]),
        }[via]
        connection = http.client.HTTPConnection(ECR_HOST, 443, timeout=TIMEOUT)
        connection.sock = tls_socket(namespace, address, ECR_HOST, trust)
        try:
            connection.request(method, path, body=body, headers={"Host": ECR_HOST, **(headers or {})})
            response = connection.getresponse()
            data, cut = read_body(response)
            return Fetched(response.status, response.msg, data, cut)
        finally:
            connection.close()

    def upload(self, repository_team: str, data: bytes) -> None:
        """Push one blob to the team's repository with a push token, straight to the registry."""
        repository = TEAM_A if repository_team == "a" else TEAM_B
        auth = self.token(repository_team, "pull", "push")
        started = self.call(
            "registry", "POST", f"/v2/{repository}/blobs/uploads/", {**auth, "Content-Length": "0"}
        )
        assert started.status == 202, (started.status, started.body[:300])
        location = urllib.parse.urlsplit(started.headers["Location"])
        query = f"{location.query}&" if location.query else ""
        done = self.call(
            "registry",
            "PUT",
            f"{location.path}?{query}digest={urllib.parse.quote(digest_of(data))}",
            {**auth, "Content-Type": "application/octet-stream"},
            data,
        )
        assert done.status == 201, (done.status, done.body[:300])

    def push_manifest(self, tag: str, manifest: dict) -> Fetched:
        """Team B pushes ``manifest`` under ``tag`` to its own repository, straight to the registry."""
        body = json.dumps(manifest).encode()
        headers = {**self.token("b", "pull", "push"), "Content-Type": manifest["mediaType"]}
        return self.call("registry", "PUT", f"/v2/{TEAM_B}/manifests/{tag}", headers, body)

    def cached(self, mirror: MirrorNode, digest: str) -> bool:
        hex_digest = digest.split(":", 1)[1]
        return (mirror.workdir / "cache" / "blobs" / "sha256" / hex_digest[:2] / hex_digest).is_file()

    def heads(self, path: str) -> int:
        return self.registry.count_requests("HEAD", path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_netns()
    work = tmp_path_factory.mktemp("grants-e2e")
    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        node_a, node_b = cluster.add("node-a"), cluster.add("node-b")
        ca = create_ca(work / "public-ca")
        tokens = TokenIssuer.create(work / "tokens")
        secret = write_secret(work / "peer-secret", os.urandom(24).hex())
        # layers with ``urls`` are allowed from one host, as registries that take foreign layers do
        validation = {"manifests": {"urls": {"allow": [r"^https://layers\.example\.org/"]}}}
        registry = Registry(registry_ns, ECR_HOST, ca, work / "registry",
                            extra_config={"auth": tokens.registry_auth(), "validation": validation})
        def overrides(node: Namespace, other: Namespace) -> dict:
            # room for the registry to be paused while requests pile up (the price test)
            return {**peer_overrides(node, [other], secret), "upstream": {"first_byte_timeout": "20s"}}

        with registry, upstream_dns(registry_ns, work / "dns", {ECR_HOST: registry_ns.address}) as dns, \
                MirrorNode(node_a, work / "a", dns, ca, overrides(node_a, node_b)) as mirror_a, \
                MirrorNode(node_b, work / "b", dns, ca, overrides(node_b, node_a)) as mirror_b:
            world = World(
                cluster,
                ca,
                registry,
                tokens,
                node_a,
                node_b,
                mirror_a,
                mirror_b,
                os.urandom(300_000),
                json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode(),
                os.urandom(1000),
                {"a": mirror_a.trust_bundle(), "b": mirror_b.trust_bundle()},
            )
            world.upload("a", world.secret)
            world.upload("b", world.own_config)
            world.upload("b", world.own_layer)
            # team A pulls its layer through node A: cached there, and announced to node B
            got = world.call("a", "GET", f"/v2/{TEAM_A}/blobs/{digest_of(world.secret)}", world.token("a"))
            assert (got.status, got.body == world.secret) == (200, True), mirror_a.log()
            assert wait_until(lambda: world.cached(mirror_a, digest_of(world.secret)), 10)
            yield world


def image_manifest(world: World, **extra: object) -> dict:
    """A valid image manifest of team B's own blobs, plus ``extra`` fields."""
    return {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": descriptor(world.own_config, OCI_CONFIG),
        "layers": [descriptor(world.own_layer)],
        **extra,
    }


def naming_d(world: World) -> dict:
    return descriptor(world.secret)


# case: (the manifest team B pushes, None when distribution 2.8 accepts it, else the error code it refuses
# with)
CASES = {
    # OCI 1.1: a registry MUST accept a subject that does not exist (distribution 2.8 ignores the field)
    "subject": (lambda w: image_manifest(w, subject=naming_d(w)), None),
    # an image manifest with an artifact's ``blobs`` list: unknown fields are kept, not checked
    "blobs": (lambda w: image_manifest(w, blobs=[naming_d(w)]), None),
    # an index's ``manifests`` list inside an image manifest: refused as ambiguous (CVE-2021-41190)
    "manifests-field": (lambda w: image_manifest(w, manifests=[naming_d(w)]), "MANIFEST_INVALID"),
    # an artifact manifest (withdrawn from OCI 1.1): distribution 2.8 does not know the media type
    "artifact": (
        lambda w: {
            "mediaType": ARTIFACT_MANIFEST,
            "artifactType": "application/x-test",
            "blobs": [naming_d(w)],
        },
        "MANIFEST_INVALID",
    ),
    # a real index naming D: distribution checks each child is a manifest of this repository
    "index": (
        lambda w: {
            "schemaVersion": 2,
            "mediaType": oci.OCI_INDEX,
            "manifests": [{**naming_d(w), "mediaType": oci.OCI_MANIFEST}],
        },
        "MANIFEST_BLOB_UNKNOWN",
    ),
    # a layer the repository does not hold: distribution checks layers in the repository's scope
    "layer": (lambda w: {**image_manifest(w), "layers": [naming_d(w)]}, "MANIFEST_BLOB_UNKNOWN"),
    # the same layer with ``urls`` from an allowed host (a non-distributable layer): not looked for
    "layer-with-urls": (
        lambda w: {
            **image_manifest(w),
            "layers": [{**naming_d(w), "urls": ["https://layers.example.org/d"]}],
        },
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_manifest_naming_a_cached_private_blob_does_not_open_it(world: World, case: str) -> None:
    build, refusal = CASES[case]
    accepted = refusal is None
    manifest = build(world)
    body = json.dumps(manifest).encode()
    d = digest_of(world.secret)
    pushed = world.push_manifest(case, manifest)
    if accepted:
        assert pushed.status == 201, (case, pushed.status, pushed.body[:300])
    else:
        codes = {error["code"] for error in json.loads(pushed.body)["errors"]}
        assert (pushed.status, refusal in codes) == (400, True), (case, pushed.status, codes)
    b_pull = world.token("b")
    blob_path = f"/v2/{TEAM_B}/blobs/{d}"
    for via in ("a", "b"):  # node A holds D; node B would find it at its peer
        # team B reads its manifest through the mirror, by tag and by digest, as a client would
        for reference in (case, digest_of(body)):
            got = world.call(via, "GET", f"/v2/{TEAM_B}/manifests/{reference}",
                             {**b_pull, "Accept": manifest["mediaType"]})
            direct = world.call("registry", "GET", f"/v2/{TEAM_B}/manifests/{reference}",
                                {**b_pull, "Accept": manifest["mediaType"]})
            assert got.status == direct.status == (200 if accepted else 404), (
                case,
                via,
                reference,
                got.status,
            )
            if accepted:
                assert got.body == direct.body == body, (case, via, reference)
        # then asks for D in its own repository: exactly what the registry answers, never team A's bytes
        lookups_b, served_a = metric(world.node_b, "dnsmirror_peers_lookups_total"), \
            metric(world.node_a, "dnsmirror_peers_served_total")
        for method, extra in (("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=100-"})):
            heads_before = world.heads(blob_path)
            got = world.call(via, method, blob_path, {**b_pull, **extra})
            direct = world.call("registry", method, blob_path, {**b_pull, **extra})
            assert got.status == direct.status == 404, (case, via, method, extra, got.status, direct.status)
            assert world.secret[100:164] not in got.body and got.body == direct.body, (
                case,
                via,
                method,
                extra,
            )
            if method == "GET" and not extra:
                assert json.loads(got.body)["errors"][0]["code"] == "BLOB_UNKNOWN"
            # the mirror asked the registry with team B's token (its HEAD, or the request passed through)
            assert world.heads(blob_path) >= heads_before + (2 if method == "HEAD" else 1), (
                case,
                via,
                method,
            )
        # team B's token in team A's repository: the registry's 401, with its challenge
        got = world.call(via, "GET", f"/v2/{TEAM_A}/blobs/{d}", b_pull)
        direct = world.call("registry", "GET", f"/v2/{TEAM_A}/blobs/{d}", b_pull)
        assert got.status == direct.status == 401, (case, via, got.status)
        assert got.headers["WWW-Authenticate"] == direct.headers["WWW-Authenticate"]
        # no peer was asked for D on team B's behalf
        assert metric(world.node_b, "dnsmirror_peers_lookups_total") == lookups_b, (case, via)
        assert metric(world.node_a, "dnsmirror_peers_served_total") == served_a, (case, via)
    assert not world.cached(world.mirror_b, d)
    # team A still reads D from node A's cache, whole and in ranges
    gets = world.registry.count_requests("GET", f"/v2/{TEAM_A}/blobs/{d}", status=200)
    own = world.call("a", "GET", f"/v2/{TEAM_A}/blobs/{d}", world.token("a"))
    assert (own.status, own.body == world.secret) == (200, True)
    ranged = world.call("a", "GET", f"/v2/{TEAM_A}/blobs/{d}", {**world.token("a"), "Range": "bytes=100-199"})
    assert (ranged.status, ranged.body) == (206, world.secret[100:200])
    assert world.registry.count_requests("GET", f"/v2/{TEAM_A}/blobs/{d}", status=200) == gets


def pull_in_parallel(world: World, via: str, requests: list[tuple[str, dict[str, str]]]) -> list[Fetched]:
    """GET every ``(path, headers)`` through the mirror at once (threads released together)."""
    barrier = threading.Barrier(len(requests), timeout=TIMEOUT)
    results: list[Fetched | BaseException | None] = [None] * len(requests)

    def get(index: int) -> None:
        path, headers = requests[index]
        try:
            barrier.wait()
            results[index] = world.call(via, "GET", path, headers)
        except BaseException as error:  # noqa: BLE001 - reported below
            results[index] = error

    threads = [threading.Thread(target=get, args=(index,), daemon=True) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert all(isinstance(result, Fetched) for result in results), results
    return results  # type: ignore[return-value]


def test_the_price_of_a_warm_pull_is_one_head_per_digest_and_concurrent_reads_share_it(world: World) -> None:
    """A 6-layer image of team B's, pulled the way containerd does (HEAD the tag, GET index and manifest by
    digest, GET config and layers in parallel): cold with one token, then warm with a new token (a new login),
    then warm again with that token, then with a third token asking for every blob four times at once."""
    layers = [os.urandom(20_000 + index) for index in range(6)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "nonce": os.urandom(8).hex()}).encode()
    for blob in (config, *layers):
        world.upload("b", blob)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                           "config": descriptor(config, OCI_CONFIG),
                           "layers": [descriptor(layer) for layer in layers]}).encode()
    pushed = world.call("registry", "PUT", f"/v2/{TEAM_B}/manifests/{digest_of(manifest)}",
                        {**world.token("b", "pull", "push"), "Content-Type": oci.OCI_MANIFEST}, manifest)
    assert pushed.status == 201, pushed.body[:300]
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.OCI_INDEX,
            "manifests": [
                {
                    **descriptor(manifest, oci.OCI_MANIFEST),
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }
    ).encode()
    pushed = world.call("registry", "PUT", f"/v2/{TEAM_B}/manifests/app",
                        {**world.token("b", "pull", "push"), "Content-Type": oci.OCI_INDEX}, index)
    assert pushed.status == 201, pushed.body[:300]
    by_digest = [f"/v2/{TEAM_B}/manifests/{digest_of(manifest)}", f"/v2/{TEAM_B}/blobs/{digest_of(config)}",
                 *(f"/v2/{TEAM_B}/blobs/{digest_of(layer)}" for layer in layers)]
    accept = {"Accept": f"{oci.OCI_INDEX}, {oci.OCI_MANIFEST}"}

    def authorisation_heads() -> int:
        return sum(world.heads(path) for path in [f"/v2/{TEAM_B}/manifests/{digest_of(index)}", *by_digest])

    def pull(token: dict[str, str], copies: int = 1, before_blobs=lambda: None) -> int:
        """One pull through node A; returns the authorisation HEADs it cost upstream."""
        before = authorisation_heads()
        tag = world.call("a", "HEAD", f"/v2/{TEAM_B}/manifests/app", {**token, **accept})
        assert (tag.status, tag.headers["Docker-Content-Digest"]) == (200, digest_of(index))
        got = world.call("a", "GET", f"/v2/{TEAM_B}/manifests/{digest_of(index)}", {**token, **accept})
        assert (got.status, got.body) == (200, index)
        got = world.call("a", "GET", by_digest[0], {**token, **accept})
        assert (got.status, got.body) == (200, manifest)
        before_blobs()
        results = pull_in_parallel(
            world, "a", [(path, token) for path in by_digest[1:] for _ in range(copies)]
        )
        expected = [blob for blob in (config, *layers) for _ in range(copies)]
        assert [(r.status, r.cut, r.body == blob) for r, blob in zip(results, expected, strict=True)] == \
            [(200, None, True)] * len(expected)
        return authorisation_heads() - before

    # cold, on a node with peers: the peers may be asked only once upstream allowed the read, so one HEAD each
    # for the manifest, the config and the six layers (the index was granted by the client's own HEAD of the
    # tag), then the GETs upstream (no peer holds them), which also grant
    assert pull(world.token("b")) == 1 + 1 + len(layers)
    assert all(world.registry.count_requests("GET", path, status=200) == 1 for path in by_digest)
    # warm, a new token (a new login): the same HEADs, and the bytes from the cache
    assert pull(world.token("b")) == 8
    token = world.token("b")
    assert pull(token) == 8
    assert pull(token) == 0  # the same token within cache.grant_ttl: nothing to ask
    # four copies of every blob read at once (the registry paused until all of them wait for its answer):
    # still one HEAD each
    merged = "dnsmirror_content_access_checks_merged_total"
    merged_before = metric(world.node_a, merged)

    def pause_the_registry() -> None:
        world.registry.process.signal(signal.SIGSTOP)
        threading.Timer(0.2, wait_then_resume).start()

    def wait_then_resume() -> None:
        try:
            wait_until(lambda: metric(world.node_a, merged) >= merged_before + 7 * 3, 8)
        finally:
            world.registry.process.signal(signal.SIGCONT)

    try:
        assert pull(world.token("b"), copies=4, before_blobs=pause_the_registry) == 8
    finally:
        world.registry.process.signal(signal.SIGCONT)
    assert metric(world.node_a, merged) == merged_before + 7 * 3
    # from cache
    assert all(world.registry.count_requests("GET", path, status=200) == 1 for path in by_digest)
