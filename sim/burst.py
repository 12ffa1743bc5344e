"""Discrete-event simulation of N nodes pulling one hot blob at once (no sockets, no Twisted reactor).

Three ways, modelled with the same links, node limit and chunked streaming:
- ``swarm``: every node runs :class:`dnsmirror.swarm.SwarmNode` (the decision code real nodes will run);
  this module only moves its messages, timers and bytes.
- ``direct``: no mirror, every node pulls from the registry.
- ``spegel``: a node advertises the blob only once it has all of it; a node that finds no holder pulls
  from the registry; a holder's uploads are not capped.

Flow-level model: the blob moves in chunks; a chunk's rate is fixed when it starts, from the shares at that
moment (the registry's egress split fairly among its open downloads; a node's NIC and its process budget
split among the streams it carries); events happen at chunk boundaries, message deliveries and timers.
A node passes on every chunk it has (pipelining): a receiver that catches up with its source waits for
the source's next chunk.

Node process budget: a node moves at most ``node_mbs`` MB/s of "receive and pass on to the local
client"; each byte it uploads to a peer costs ``upload_cost`` of that (so a node receiving and feeding 4
peers runs every stream at node_mbs / (1 + 4 * upload_cost)).

``python -m sim.burst --nodes 1000`` prints a table; ``--json`` the raw figures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field

from dnsmirror import swarm
from dnsmirror.config import HostPort

MB = 1_000_000
MIB = 1 << 20
GIB = 1 << 30
DIGEST = "sha256:" + "b1" * 32


@dataclass(frozen=True)
class Params:
    """What is simulated; defaults are one cluster pulling a new 1 GiB layer."""

    nodes: int = 1000
    blob_bytes: int = GIB
    chunk_bytes: int = 16 * MIB
    node_link_gbit: float = 10.0  # each node's NIC, each direction
    registry_gbit: float = 2.0  # the registry's egress, shared fairly by its downloads
    node_mbs: float = 370.0  # one dnsmirror process: receive + pass on (bench/RESULTS.md, peers)
    upload_cost: float = 0.5  # an uploaded byte's cost, relative to a received one
    node_latency: float = 0.0005  # one way, node to node (s)
    registry_rtt: float = 0.02  # node to registry and back (s): the access check, a fetch's first byte
    start_spread: float = 0.01  # nodes start uniformly within this (s): "at the same instant"
    kill: int = 0  # nodes whose process dies at a random moment of the transfer
    kill_window: tuple[float, float] = (0.5, 5.0)  # when they die (s)
    kill_fill_holder_at: float | None = None  # also kill the node that fetches from upstream first, then
    hang: int = 0  # nodes that stop sending without closing (detected by the stall timeout)
    max_uploads: int = 4
    seed: int = 1
    max_sim_seconds: float = 1e6


@dataclass
class Result:
    mode: str
    nodes: int
    finished: int
    failed: int
    dead: int  # killed or hung on purpose
    upstream_blobs: float  # registry egress / blob size
    upstream_fetches: int  # downloads started at the registry
    max_concurrent_uploads: int  # of the blob by one node, at any moment
    max_uploaded_blobs: float  # bytes one node uploaded / blob size
    first_done: float
    median_done: float
    all_done: float  # when the last surviving node finished (s), inf if one never did
    single_transfer: float  # one node alone, straight from the registry (s)
    events: int
    wall_seconds: float

    def bound(self, k: int) -> float:
        """The design target (1 + log_k N) single-transfer times."""
        return (1 + math.log(max(self.nodes, 1), k)) * self.single_transfer


@dataclass(eq=False)
class Stream:
    src: Node | None  # None: the registry
    dst: Node
    next_chunk: int
    closed: bool = False
    frozen: bool = False  # its source hung: no more bytes, the connection stays open
    rate: float = 0.0
    chunk_started: float = 0.0
    in_flight: bool = False


@dataclass(eq=False)
class Node:
    index: int
    addr: HostPort
    alive: bool = True
    hung: bool = False
    chunks: int = 0
    done_at: float | None = None
    failed: bool = False
    inbound: Stream | None = None
    outbound: dict[Stream, None] = field(default_factory=dict)  # ordered: runs repeat exactly
    waiters: dict[int, list[Stream]] = field(default_factory=dict)
    uploaded: int = 0
    started_upstream: float | None = None
    logic: swarm.SwarmNode | None = None


class Simulation:
    def __init__(self, params: Params, mode: str) -> None:
        if mode not in ("swarm", "direct", "spegel"):
            raise ValueError(f"mode: {mode!r} is not swarm, direct or spegel")
        self.p = params
        self.mode = mode
        self.rng = random.Random(params.seed)
        self.now = 0.0
        self.queue: list[tuple[float, int, str, tuple]] = []
        self.seq = 0
        self.events = 0
        self.total_chunks = math.ceil(params.blob_bytes / params.chunk_bytes)
        self.link = params.node_link_gbit * 1e9 / 8
        self.registry = params.registry_gbit * 1e9 / 8
        self.budget = params.node_mbs * MB
        self.upstream_open = 0
        self.upstream_bytes = 0.0
        self.upstream_fetches = 0
        self.max_uploads_seen = 0
        self.complete_holders: list[Node] = []  # spegel's advertised copies
        self.pending = params.nodes  # alive nodes neither done nor failed
        addrs = [HostPort(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 5001) for i in range(params.nodes)]
        self.nodes = [Node(i, a) for i, a in enumerate(addrs)]
        self.by_addr = {n.addr: n for n in self.nodes}
        if mode == "swarm":
            membership = swarm.Membership(addrs)
            settings = swarm.SwarmSettings(max_uploads=params.max_uploads)
            for node in self.nodes:
                node.logic = swarm.SwarmNode(node.addr, membership, settings)

    # ---- event queue ----

    def at(self, when: float, kind: str, *args: object) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (when, self.seq, kind, args))

    def run(self) -> Result:
        wall = time.perf_counter()
        p = self.p
        for node in self.nodes:
            self.at(self.rng.uniform(0, p.start_spread), "start", node)
        victims = self.rng.sample(self.nodes, min(p.kill + p.hang, len(self.nodes)))
        for i, node in enumerate(victims):
            self.at(self.rng.uniform(*p.kill_window), "kill" if i < p.kill else "hang", node)
        if p.kill_fill_holder_at is not None:
            self.at(p.kill_fill_holder_at, "kill_fill_holder")
        while self.queue and self.pending:
            when, _, kind, args = heapq.heappop(self.queue)
            if when > p.max_sim_seconds:
                break
            self.now = when
            self.events += 1
            getattr(self, "_on_" + kind)(*args)
        return self._result(time.perf_counter() - wall)

    def _result(self, wall: float) -> Result:
        p = self.p
        survivors = [n for n in self.nodes if n.alive]
        done = sorted(n.done_at for n in survivors if n.done_at is not None)
        failed = sum(1 for n in survivors if n.failed)
        everyone = len(done) == len(survivors) - failed and failed == 0
        single = p.blob_bytes / min(self.registry, self.budget, self.link) + 2 * p.registry_rtt
        return Result(
            mode=self.mode, nodes=p.nodes, finished=len(done), failed=failed, dead=p.nodes - len(survivors),
            upstream_blobs=self.upstream_bytes / p.blob_bytes, upstream_fetches=self.upstream_fetches,
            max_concurrent_uploads=self.max_uploads_seen,
            max_uploaded_blobs=max((n.uploaded for n in self.nodes), default=0) / p.blob_bytes,
            first_done=done[0] if done else math.inf,
            median_done=done[len(done) // 2] if done else math.inf,
            all_done=done[-1] if everyone and done else math.inf,
            single_transfer=single, events=self.events, wall_seconds=wall)

    # ---- bytes ----

    def _chunk_size(self, index: int) -> int:
        return min(self.p.chunk_bytes, self.p.blob_bytes - index * self.p.chunk_bytes)

    def _stream_cap(self, node: Node) -> float:
        receiving = 1 if node.inbound is not None else 0
        return self.budget / max(receiving + self.p.upload_cost * len(node.outbound), 1e-9)

    def _open(self, src: Node | None, dst: Node) -> Stream:
        stream = Stream(src, dst, dst.chunks)
        assert dst.inbound is None and dst.done_at is None, (dst.addr, dst.inbound, dst.done_at, self.now)
        dst.inbound = stream
        if src is None:
            self.upstream_open += 1
            self.upstream_fetches += 1
            if dst.started_upstream is None:
                dst.started_upstream = self.now
        else:
            src.outbound[stream] = None
            self.max_uploads_seen = max(self.max_uploads_seen, len(src.outbound))
        return stream

    def _close(self, stream: Stream) -> None:
        if stream.closed:
            return
        stream.closed = True
        if stream.dst.inbound is stream:
            stream.dst.inbound = None
        if stream.src is None:
            self.upstream_open -= 1
            if stream.in_flight:  # the registry sent part of a chunk the receiver will not keep
                self.upstream_bytes += stream.rate * (self.now - stream.chunk_started)
        else:
            stream.src.outbound.pop(stream, None)

    def _next_chunk(self, stream: Stream) -> None:
        if stream.closed or stream.frozen:
            return
        src, dst, index = stream.src, stream.dst, stream.next_chunk
        if src is not None and src.chunks <= index:
            src.waiters.setdefault(index, []).append(stream)  # pipelining: wait for the source's next chunk
            stream.in_flight = False
            return
        if src is None:
            rate = min(self.registry / max(self.upstream_open, 1), self._stream_cap(dst), self.link)
        else:
            rate = min(self.link / len(src.outbound), self._stream_cap(src), self._stream_cap(dst), self.link)
        stream.rate = rate
        stream.chunk_started = self.now
        stream.in_flight = True
        self.at(self.now + self._chunk_size(index) / rate, "chunk", stream, index)

    def _on_chunk(self, stream: Stream, index: int) -> None:
        if stream.closed or stream.frozen or stream.next_chunk != index:
            return
        src, dst = stream.src, stream.dst
        size = self._chunk_size(index)
        stream.in_flight = False
        if src is None:
            self.upstream_bytes += size
        else:
            src.uploaded += size
        assert dst.alive, (dst.addr, self.now)
        dst.chunks = index + 1
        stream.next_chunk = index + 1
        for waiting in dst.waiters.pop(index, []):
            self._next_chunk(waiting)
        if dst.logic is not None:
            self._apply(dst, dst.logic.handle(swarm.BytesReceived(DIGEST, dst.chunks * self.p.chunk_bytes),
                                              self.now))
        if dst.chunks == self.total_chunks:
            self._close(stream)
            dst.done_at = self.now
            self.pending -= 1
            if self.mode == "spegel":
                self.complete_holders.append(dst)
            if dst.logic is not None:
                self._apply(dst, dst.logic.handle(swarm.Completed(DIGEST), self.now))
                if src is not None and src.logic is not None and src.alive and not src.hung:
                    self._apply(src, src.logic.handle(swarm.UploadEnded(DIGEST, dst.addr, swarm.Outcome.DONE),
                                                      self.now))
            return
        self._next_chunk(stream)

    def _fetch(self, src: Node | None, dst: Node) -> None:
        stream = self._open(src, dst)
        delay = self.p.registry_rtt if src is None else 2 * self.p.node_latency
        self.at(self.now + delay, "first_chunk", stream)

    def _on_first_chunk(self, stream: Stream) -> None:
        self._next_chunk(stream)

    # ---- failures ----

    def _gone(self, node: Node) -> None:
        node.alive = False
        if node.done_at is None and not node.failed:
            self.pending -= 1

    def _on_kill(self, node: Node) -> None:
        if not node.alive:
            return
        self._gone(node)
        if node.inbound is not None:
            stream = node.inbound
            self._close(stream)
            if stream.src is not None:
                self.at(self.now + self.p.node_latency, "upload_ended", stream.src, node, swarm.Outcome.DIED)
        for stream in list(node.outbound):
            self._close(stream)
            self.at(self.now + self.p.node_latency, "source_failed", stream.dst, stream, swarm.Outcome.DIED)

    def _on_hang(self, node: Node) -> None:
        if not node.alive:
            return
        self._gone(node)
        node.hung = True
        for stream in node.outbound:
            stream.frozen = True  # the receiver finds out by its stall timeout
        stream = node.inbound
        if stream is not None:
            self._close(stream)  # it stops reading
        if stream is not None and stream.src is not None:
            self.at(self.now + swarm.SwarmSettings().stall_timeout, "upload_ended", stream.src, node,
                    swarm.Outcome.STALLED)

    def _on_kill_fill_holder(self) -> None:
        fetchers = [n for n in self.nodes if n.started_upstream is not None and n.alive]
        if fetchers:
            self._on_kill(min(fetchers, key=lambda n: n.started_upstream))

    def _on_source_failed(self, dst: Node, stream: Stream, outcome: swarm.Outcome) -> None:
        if not dst.alive or dst.inbound not in (stream, None):
            return
        if dst.logic is not None:
            self._apply(dst, dst.logic.handle(
                swarm.SourceFailed(DIGEST, dst.chunks * self.p.chunk_bytes, outcome), self.now))
        elif self.mode == "spegel":
            self._spegel_source(dst)
        else:
            self._fetch(None, dst)

    def _on_upload_ended(self, src: Node, receiver: Node, outcome: swarm.Outcome) -> None:
        if src.alive and src.logic is not None:
            self._apply(src, src.logic.handle(swarm.UploadEnded(DIGEST, receiver.addr, outcome), self.now))

    # ---- the three ways ----

    def _on_start(self, node: Node) -> None:
        if not node.alive:
            return
        if node.logic is not None:
            self._apply(node, node.logic.handle(swarm.Wanted(DIGEST), self.now))
        elif self.mode == "spegel":
            self.at(self.now + 2 * self.p.node_latency, "spegel_lookup", node)
        else:
            self._fetch(None, node)

    def _on_spegel_lookup(self, node: Node) -> None:
        if node.alive:
            self._spegel_source(node)

    def _spegel_source(self, node: Node) -> None:
        holders = [h for h in self.complete_holders if h.alive]
        self._fetch(self.rng.choice(holders) if holders else None, node)

    def _on_message(self, node: Node, sender: HostPort, message: swarm.Message) -> None:
        if node.alive:
            self._apply(node, node.logic.handle(swarm.MessageReceived(sender, message), self.now))

    def _on_timer(self, node: Node, event: swarm.TimerFired) -> None:
        if node.alive:
            self._apply(node, node.logic.handle(event, self.now))

    def _on_peer_connect(self, dst: Node, holder: Node) -> None:
        if not dst.alive:
            return
        if not holder.alive:
            if not holder.hung:  # a dead process refuses the connection; a hung one lets it time out
                self._apply(
                    dst,
                    dst.logic.handle(
                        swarm.SourceFailed(DIGEST, dst.chunks * self.p.chunk_bytes, swarm.Outcome.DIED),
                        self.now,
                    ),
                )
            return
        answer = holder.logic.handle(swarm.UploadRequested(DIGEST, dst.addr), self.now)
        if any(isinstance(a, swarm.AcceptUpload) for a in answer):
            self._fetch(holder, dst)
        else:
            self._apply(dst, dst.logic.handle(
                swarm.SourceFailed(DIGEST, dst.chunks * self.p.chunk_bytes, swarm.Outcome.REFUSED), self.now))

    def _apply(self, node: Node, actions: list[swarm.Action]) -> None:
        """Carry out what the decision code asked for, as the network and the disk would."""
        p = self.p
        for action in actions:
            match action:
                case swarm.CheckAccess():
                    self.at(self.now + p.registry_rtt, "access", node)
                case swarm.Send(to, message):
                    delay = 0.0 if to == node.addr else p.node_latency
                    self.at(self.now + delay, "message", self.by_addr[to], node.addr, message)
                case swarm.SetTimer(digest, kind, when):
                    self.at(max(when, self.now), "timer", node, swarm.TimerFired(digest, kind))
                case swarm.FetchUpstream(_, offset):
                    assert offset == node.chunks * p.chunk_bytes or offset == 0
                    node.chunks = offset // p.chunk_bytes
                    self._fetch(None, node)
                case swarm.FetchPeer(_, holder, offset):
                    node.chunks = offset // p.chunk_bytes
                    self.at(self.now + 2 * p.node_latency, "peer_connect", node, self.by_addr[holder])
                case swarm.Abort():
                    stream = node.inbound
                    if stream is not None:
                        self._close(stream)
                        if stream.src is not None:
                            self.at(self.now + p.node_latency, "upload_ended", stream.src, node,
                                    swarm.Outcome.STALLED)
                case swarm.FailPull() | swarm.PassRefusal():
                    if not node.failed and node.done_at is None:
                        node.failed = True
                        self.pending -= 1

    def _on_access(self, node: Node) -> None:
        if node.alive:
            self._apply(node, node.logic.handle(swarm.AccessChecked(DIGEST, True), self.now))


def simulate(params: Params, mode: str) -> Result:
    """Run one way of pulling and return its figures."""
    return Simulation(params, mode).run()


def _seconds(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:,.1f}"


def table(results: list[Result], params: Params) -> str:
    """A Markdown table of ``results`` (one row per way)."""
    names = {"swarm": "dnsmirror burst coordination (dnsmirror/swarm.py)", "direct": "no mirror",
             "spegel": "Spegel-like (advertise when complete)"}
    lines = ["| way | upstream egress (blobs) | registry downloads | max concurrent uploads / node "
             "| max uploaded by one node (blobs) | first done s | median s | all done s | unfinished |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {names[r.mode]} | {r.upstream_blobs:,.2f} | {r.upstream_fetches:,} | "
                     f"{r.max_concurrent_uploads} | {r.max_uploaded_blobs:,.2f} | {_seconds(r.first_done)} | "
                     f"{_seconds(r.median_done)} | {_seconds(r.all_done)} | "
                     f"{r.nodes - r.dead - r.finished} |")
    single = results[0].single_transfer
    lines.append("")
    lines.append(f"One node alone from the registry: {single:.1f} s; the design target "
                 f"(1 + log_{params.max_uploads} N) single transfers: "
                 f"{results[0].bound(params.max_uploads):.1f} s. Simulated events: "
                 + ", ".join(f"{r.mode} {r.events:,} in {r.wall_seconds:.1f} s" for r in results) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.burst", description=__doc__.split("\n")[0])
    defaults = Params()
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--blob-mib", type=float, default=defaults.blob_bytes / MIB)
    parser.add_argument("--chunk-mib", type=float, default=defaults.chunk_bytes / MIB)
    parser.add_argument("--node-gbit", type=float, default=defaults.node_link_gbit)
    parser.add_argument("--registry-gbit", type=float, default=defaults.registry_gbit)
    parser.add_argument("--node-mbs", type=float, default=defaults.node_mbs)
    parser.add_argument("--upload-cost", type=float, default=defaults.upload_cost)
    parser.add_argument("--spread", type=float, default=defaults.start_spread)
    parser.add_argument("--kill", type=int, default=0, help="nodes whose process dies mid-transfer")
    parser.add_argument("--hang", type=int, default=0, help="nodes that stop sending without closing")
    parser.add_argument("--kill-window", type=float, nargs=2, default=defaults.kill_window)
    parser.add_argument("--kill-fill-holder-at", type=float, default=None)
    parser.add_argument("--max-uploads", type=int, default=defaults.max_uploads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--modes", default="swarm,direct,spegel")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    params = Params(
        nodes=args.nodes,
        blob_bytes=int(args.blob_mib * MIB),
        chunk_bytes=int(args.chunk_mib * MIB),
        node_link_gbit=args.node_gbit,
        registry_gbit=args.registry_gbit,
        node_mbs=args.node_mbs,
        upload_cost=args.upload_cost,
        start_spread=args.spread,
        kill=args.kill,
        hang=args.hang,
        kill_window=tuple(args.kill_window),
        kill_fill_holder_at=args.kill_fill_holder_at,
        max_uploads=args.max_uploads,
        seed=args.seed,
    )
    results = [simulate(params, mode) for mode in args.modes.split(",")]
    if args.json:
        json.dump([asdict(r) for r in results], sys.stdout, indent=1)
        print()
    else:
        print(table(results, params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
