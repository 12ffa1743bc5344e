"""The fault table: for each fault, what a client gets with dnsmirror against what it gets without it.

One world, real components: Debian's docker-registry (the healthy upstream), a misbehaving registry
(:mod:`harness.faulty`) for the upstream faults, misbehaving peer nodes (the same server, plain HTTP, one
address per fault so that one peer's back-off does not hide the next fault) and an address where no
peer answers at all, and one dnsmirror node started with ``ulimit -n 256``. Each row names the fault,
what the client does, and the outcomes allowed with and without the mirror. "Without" is measured in
the same run by sending the same request straight to the faulty upstream (for peer faults: to the
registry, since without dnsmirror there are no peers). With the mirror, the outcome must be at least as
good as without (:data:`RANK`), unless the row names a known shortfall; no response ever completes
with a wrong byte.

Rows written elsewhere, same shape: the cache disk (full, read-only, damaged, killed mid-fill) in
tests/test_faults_disk.py, the DNS upstream (dead, refusing, spoofing) in tests/test_faults_dns.py.
docs/reliability.md lists the whole table.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import ECR_HOST, ECR_HOST_2, require_netns
from harness.faulty import FaultyServer
from harness.images import build_image, push_image, skopeo_copy
from harness.netns import Cluster, Namespace
from harness.registry import Registry
from mirror_support import MirrorNode, curl_argv, registry_upstream, scrape_metrics

from dnsmirror.config import HostPort
from dnsmirror.peers import rendezvous

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("curl") is None or shutil.which("skopeo") is None
                       or shutil.which("dig") is None or shutil.which("prlimit") is None,
                       reason="curl, skopeo, dig and prlimit are needed (scripts/setup.sh)"),
]

FAULTY_HOST = ECR_HOST_2
REPOSITORY = "faults/app"
PLAIN_NAME = "plain.example.test"  # a name the mirror does not capture: always forwarded
PLAIN_ADDRESS = "192.0.2.53"
PEER_PORT = 5001
BLOB_SIZE = 600_000
# how long a client waits: well past the mirror's upstream timeouts (3 s), so that the mirror's answer and
# a client's own timeout are told apart even on a loaded machine
CLIENT_TIMEOUT = 10
NOFILE = 256
FLOOD_CONNECTIONS = 300
# enough addresses that the flood's even share of the HTTPS cap (about 2) is below the connections a pull
# opens at once: the pull stays whole because the listener prefers an address that sends requests to one
# that only holds sockets, and never takes a connection serving a request
FLOOD_ADDRESSES = 12
PEER_FLOOD_CONNECTIONS = 150

# how good an outcome is for a client: a clear answer beats a cut, a cut beats hanging until its own
# timeout, and a complete response with wrong bytes is the worst (the client only finds out afterwards)
RANK = {
    "ok": 6,
    "ok after retry": 5,
    "status 5xx": 4,
    "cut": 3,
    "timeout": 2,
    "refused": 2,
    "failed": 1,
    "wrong": 0,
}


@dataclass(frozen=True)
class Row:
    """One fault: what goes wrong, what the client does, and what it may get with and without dnsmirror."""

    fault: str
    mode: str  # harness.faulty mode, or a named scenario
    where: str  # "upstream", "peer", or "node"
    client: str
    with_mirror: frozenset[str]
    without: frozenset[str]
    promise: str
    shortfall: str | None = None  # why the mirror may do worse than no mirror, for a known limit
    again: str | None = None  # what a second request through the mirror gets (nothing wrong was cached)

    @property
    def id(self) -> str:
        return self.fault.replace(" ", "-").replace(",", "")


GET = "curl GET of a blob by digest"
RETRIED = "curl GET of a blob by digest, once more if it did not succeed (as containerd retries)"

TABLE = [
    Row("upstream stalled before answering", "stall_headers", "upstream", GET,
        frozenset({"status 5xx"}), frozenset({"timeout"}),
        "a 5xx once upstream.first_byte_timeout passed, instead of hanging until the client gives up"),
    Row("upstream stalled mid-body", "stall_body", "upstream", GET,
        frozenset({"cut"}), frozenset({"timeout"}),
        "the response is cut once upstream.read_timeout passed (the client retries), never completed"),
    Row("upstream slow", "slow", "upstream", GET,
        frozenset({"ok"}), frozenset({"ok"}),
        "the right bytes, streamed as they come"),
    Row("upstream 5xx", "error", "upstream", GET,
        frozenset({"status 5xx"}), frozenset({"status 5xx"}),
        "upstream's error, passed on"),
    Row("upstream closed mid-body", "cut", "upstream", GET,
        frozenset({"cut"}), frozenset({"cut"}),
        "the response is cut as upstream's was, never completed; nothing is cached", again="cut"),
    Row("upstream corrupt", "corrupt", "upstream", GET,
        frozenset({"cut"}), frozenset({"wrong"}),
        "the response is cut before its last byte (the digest does not match): never a complete wrong blob, "
        "and nothing is cached", again="cut"),
    Row("peer stalled before answering", "stall_headers", "peer", RETRIED,
        frozenset({"ok"}), frozenset({"ok"}),
        "the right bytes from upstream once peers.timeout passed"),
    Row("peer stalled mid-body", "stall_body", "peer", RETRIED,
        frozenset({"ok"}), frozenset({"ok"}),
        "the right bytes: upstream sends the rest once the peer stalled for its read timeout"),
    Row("peer lying", "corrupt", "peer", RETRIED,
        frozenset({"ok after retry"}), frozenset({"ok"}),
        "never a complete wrong blob: the response is cut before its last byte, the peer is skipped, and "
        "the retry is served from upstream",
        shortfall="peer bytes stream to the client before the digest can be checked, so the first "
                  "response is cut where a client without the mirror would have got the blob at once"),
    Row("peer killed mid-body", "die", "peer", RETRIED,
        frozenset({"ok"}), frozenset({"ok"}),
        "the right bytes: upstream sends the rest, the client sees no break"),
    Row("peer node gone", "gone", "peer", RETRIED,
        frozenset({"ok"}), frozenset({"ok"}),
        "the right bytes from upstream once peers.timeout passed"),
    Row("descriptor exhaustion", "flood", "node",
        f"skopeo copy of an image, dig (UDP and TCP), while {FLOOD_CONNECTIONS} idle connections from "
        f"{FLOOD_ADDRESSES} other addresses are held open on :443, {PEER_FLOOD_CONNECTIONS} on the peer "
        f"port and {FLOOD_CONNECTIONS} on the DNS's TCP port (dnsmirror under ulimit -n {NOFILE})",
        frozenset({"ok"}), frozenset({"ok"}),
        "the pull succeeds and the DNS answers: the flood's connections give way to the pull's, and the "
        "flood gets nothing else"),
]


@dataclass
class World:
    cluster: Cluster
    node: Namespace
    attacker: Namespace
    direct: Namespace  # a namespace that reaches the registry without dnsmirror
    registry: Registry
    faulty: FaultyServer
    peers: FaultyServer
    peer_addresses: dict[str, HostPort]  # fault mode -> the peer address that misbehaves that way
    all_peers: list[HostPort]
    mirror: MirrorNode
    upstream_dns: str
    image: str
    workdir: Path


PEER_MODES = ("stall_headers", "stall_body", "corrupt", "die")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    require_netns()
    tmp = tmp_path_factory.mktemp("faults")
    with Cluster() as cluster:
        faulty_ns = cluster.add("faulty")
        peers_ns = cluster.add("peers")
        node = cluster.add("node")
        attacker = cluster.add("attacker")
        peer_addresses = {PEER_MODES[0]: HostPort(peers_ns.address, PEER_PORT)}
        for mode in PEER_MODES[1:]:
            peer_addresses[mode] = HostPort(peers_ns.add_address(), PEER_PORT)
        # an address of the subnet that no namespace holds: a node that is gone
        peer_addresses["gone"] = HostPort(cluster.allocate_address(), PEER_PORT)
        for _ in range(FLOOD_ADDRESSES - 1):
            attacker.add_address()
        secret = tmp / "peer-secret"
        secret.write_text(os.urandom(24).hex())
        secret.chmod(0o600)
        names = {FAULTY_HOST: faulty_ns.address, PLAIN_NAME: PLAIN_ADDRESS}
        overrides = {
            "upstream": {"first_byte_timeout": "3s", "read_timeout": "3s"},
            "peers": {"listen": f"{node.address}:{PEER_PORT}", "secret_file": str(secret), "lookup": 1,
                      "timeout": "1s", "static": [str(peer) for peer in peer_addresses.values()]},
            "dns": {"ttl": 1},
            "metrics": {"listen": f"{node.address}:9090"},
        }
        with registry_upstream(cluster, tmp, names=names) as upstream, \
                FaultyServer(faulty_ns, tmp / "faulty", ca=upstream.ca, hostname=FAULTY_HOST) as faulty, \
                FaultyServer(peers_ns, tmp / "peers", port=PEER_PORT, address="0.0.0.0") as peers:
            image = build_image(tmp / "image", tag="v1", big_layer_size=2_000_000)
            reference = f"{ECR_HOST}/{REPOSITORY}:v1"
            push_image(image, upstream.pusher, reference, ca_file=upstream.ca.cert_path)
            mirror = MirrorNode(node, tmp / "mirror", upstream.dns, upstream.ca, overrides, nofile=NOFILE)
            with mirror:
                yield World(cluster, node, attacker, upstream.pusher, upstream.registry, faulty, peers,
                            peer_addresses, list(peer_addresses.values()), mirror, upstream.dns, reference,
                            tmp)


# --- clients and outcomes ------------------------------------------------------------------------------


def curl_get(namespace: Namespace, host: str, address: str, path: str, trust: Path, out: Path,
             max_time: float) -> tuple[int, int, bytes]:
    """(curl exit status, HTTP status, body) of one GET of ``https://host{path}`` sent to ``address``."""
    done = namespace.run(curl_argv(host, address, path, trust, "-o", str(out), "-w", "%{http_code}",
                                   max_time=max_time), check=False, timeout=max_time + 30)
    body = out.read_bytes() if out.exists() else b""
    out.unlink(missing_ok=True)
    return done.returncode, int(done.stdout or 0), body


def classify(exit_status: int, status: int, body: bytes, expected: bytes) -> str:
    """One word for what the client got (:data:`RANK`)."""
    if exit_status == 0:
        if status == 200:
            return "ok" if body == expected else "wrong"
        return "status 5xx" if status >= 500 else f"status {status}"
    if exit_status == 28:
        return "timeout"
    if exit_status == 7:
        return "refused"
    return "cut"


def fetch(world: World, host: str, address: str, digest: str, expected: bytes, out: Path, retry: bool,
          max_time: float = CLIENT_TIMEOUT) -> str:
    path = f"/v2/{REPOSITORY}/blobs/{digest}"
    outcome = classify(*curl_get(world.node, host, address, path, world.mirror.trust_bundle(), out, max_time),
                       expected)
    if outcome == "wrong":
        return outcome  # a complete response with wrong bytes: nothing after it repairs that
    if retry and outcome != "ok":
        again = classify(
            *curl_get(world.node, host, address, path, world.mirror.trust_bundle(), out, max_time), expected
        )
        return "ok after retry" if again == "ok" else outcome
    return outcome


def blob_for_peer(world: World, peer: HostPort, size: int) -> bytes:
    """Random bytes whose digest's first peer in rendezvous order is ``peer`` (so that this peer is asked)."""
    for _ in range(200):
        data = os.urandom(size)
        if rendezvous("sha256:" + hashlib.sha256(data).hexdigest(), world.all_peers)[0] == peer:
            return data
    raise AssertionError("no blob found for that peer")


def run_transfer_row(world: World, row: Row) -> tuple[str, str, str]:
    """(with, without, what the faulty side saw) for an upstream or peer row."""
    out = world.workdir / f"out-{row.id}"
    retry = row.client == RETRIED
    if row.where == "upstream":
        data = os.urandom(BLOB_SIZE)
        digest = world.faulty.put(data, row.mode)
        host, direct = FAULTY_HOST, world.faulty.namespace.address
    else:
        peer = world.peer_addresses[row.mode]
        data = blob_for_peer(world, peer, BLOB_SIZE)
        digest, _ = world.registry.place_blob(REPOSITORY, [data])
        if row.mode != "gone":
            world.peers.put(data, row.mode)
        host, direct = ECR_HOST, world.registry.namespace.address
    with ThreadPoolExecutor(2) as both:
        with_mirror = both.submit(
            fetch, world, host, world.mirror.address, digest, data, out.with_suffix(".with"), retry
        )
        without = both.submit(fetch, world, host, direct, digest, data, out.with_suffix(".without"), retry)
        outcomes = with_mirror.result(), without.result()
    if row.again is not None:
        again = fetch(world, host, world.mirror.address, digest, data, out.with_suffix(".again"), retry)
        assert again == row.again, f"{row.fault}: a second request through the mirror got {again!r}"
    seen = [entry for entry in (world.peers if row.where == "peer" else world.faulty).requests()
            if digest.removeprefix("sha256:") in entry["path"]]
    return outcomes[0], outcomes[1], f"{len(seen)} request(s) reached the faulty {row.where}"


# --- the descriptor flood ------------------------------------------------------------------------------

FLOOD_SCRIPT = r"""
import json, select, socket, sys, time
target, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sources = sys.argv[5].split(",")
held, opened, dropped = {}, 0, 0
def connect(n):
    global opened
    s = socket.socket()
    s.setblocking(False)
    s.bind((sources[n % len(sources)], 0))
    try:
        s.connect((target, port))
    except BlockingIOError:
        pass
    opened += 1
    held[s] = n
end = time.monotonic() + seconds
for n in range(count):
    connect(n)
while time.monotonic() < end:
    readable, _, _ = select.select(list(held), [], [], 0.2)
    for s in readable:
        try:
            gone = s.recv(1) == b""
        except OSError:
            gone = True
        if gone:
            n = held.pop(s)
            s.close()
            dropped += 1
            connect(n)  # a flood reconnects at once
    print(json.dumps({"held": len(held), "opened": opened, "dropped": dropped}), flush=True)
"""


def run_flood_row(world: World, row: Row) -> tuple[str, str, str]:
    """Hold the flood on :443, then pull and resolve through the mirror, and straight from upstream."""
    mirror = world.mirror
    flood = world.attacker.start([sys.executable, "-c", FLOOD_SCRIPT, mirror.address, "443",
                                  str(FLOOD_CONNECTIONS), "60", ",".join(world.attacker.addresses)], "flood")
    # the peer listener faces the whole network too: a flood there at the same time takes nothing either
    peer_flood = world.attacker.start([sys.executable, "-c", FLOOD_SCRIPT, mirror.address, str(PEER_PORT),
                                       str(PEER_FLOOD_CONNECTIONS), "60", ",".join(world.attacker.addresses)],
                                      "peer-flood")
    # and the DNS's TCP listener: the node's resolver keeps answering
    dns_flood = world.attacker.start([sys.executable, "-c", FLOOD_SCRIPT, mirror.address, "53",
                                      str(FLOOD_CONNECTIONS), "60", ",".join(world.attacker.addresses)],
                                     "dns-flood")
    try:
        time.sleep(3)  # the flood is in place before the pull starts
        problems = []
        with ThreadPoolExecutor(2) as both:
            pulled = both.submit(skopeo_copy, world.node, f"docker://{world.image}",
                                 f"oci:{world.workdir / 'pulled-with'}:x", ca_file=mirror.trust_bundle(),
                                 timeout=60, check=False)
            answers = both.submit(dns_answers, world.node, mirror.address)
            if pulled.result().returncode != 0:
                problems.append(f"pull: {pulled.result().stderr.decode(errors='replace')[-300:]}")
            problems += answers.result()
        # without dnsmirror the node resolves the registry itself and pulls from it: the pusher's view
        direct = skopeo_copy(
            world.direct,
            f"docker://{world.image}",
            f"oci:{world.workdir / 'pulled-without'}:x",
            ca_file=mirror.public_ca.cert_path,
            timeout=60,
            check=False,
        )
        without = "ok" if direct.returncode == 0 else "failed"
        state = flood.stdout().strip().splitlines()
        assert flood.alive() and state, flood.describe()
        assert peer_flood.alive() and peer_flood.stdout().strip(), peer_flood.describe()
        assert dns_flood.alive() and dns_flood.stdout().strip(), dns_flood.describe()
    finally:
        flood.stop()
        peer_flood.stop()
        dns_flood.stop()
    records = mirror.log_records()
    refusals = [record for record in records if record.get("event") == "connections_refused"]
    # the flood met the cap, and was reported once per period, not once per connection
    assert {record.get("listener") for record in refusals} == {"https", "peers"}, refusals[-3:]
    for listener in ("https", "peers"):
        assert metric(world.node, mirror.address, f"dnsmirror_{listener}_connections_refused_total") > 0
    assert len(refusals) <= 10, refusals[-3:]
    with_mirror = "ok" if not problems else "failed"
    return (
        with_mirror,
        without,
        f"flood: {state[-1]}; {len(refusals)} refusal report(s); problems: {problems}",
    )


def metric(namespace: Namespace, address: str, name: str) -> float:
    samples = scrape_metrics(namespace, address)
    assert name in samples, f"{name} not in the metrics: {sorted(samples)[:20]}"
    return samples[name]


def dns_answers(namespace: Namespace, server: str) -> list[str]:
    """What is wrong with the DNS at ``server``: a captured and a forwarded name, over UDP and TCP."""
    problems = []
    for name, expected in ((ECR_HOST, server), (PLAIN_NAME, PLAIN_ADDRESS)):
        for transport in ("+notcp", "+tcp"):
            done = namespace.run(["dig", f"@{server}", name, "A", "+short", "+time=2", "+tries=2", transport],
                                 check=False, timeout=30)
            if expected not in done.stdout.decode().split():
                problems.append(f"dig {name} {transport}: {done.stdout!r} {done.stderr!r}")
    return problems


# --- the table -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", TABLE, ids=[row.id for row in TABLE])
def test_fault(world: World, row: Row) -> None:
    if row.where == "node":
        with_mirror, without, seen = run_flood_row(world, row)
    else:
        with_mirror, without, seen = run_transfer_row(world, row)
    report = f"{row.fault}: with dnsmirror {with_mirror!r}, without {without!r} ({seen})"
    print("FAULT-ROW", report)
    assert with_mirror != "wrong", report
    assert without in row.without, report
    assert with_mirror in row.with_mirror, report
    if row.shortfall is None:
        assert RANK[with_mirror] >= RANK[without], report
    assert world.mirror.process.alive(), world.mirror.log()
    if row.where in ("upstream", "peer") and row.mode != "gone":
        assert not seen.startswith("0 "), report  # the fault was met, not bypassed


def test_the_table_is_documented() -> None:
    """docs/reliability.md lists every row of this table."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text()
    missing = [row.fault for row in TABLE if row.fault not in text]
    assert missing == []

