"""Burst coordination between nodes: every decision a node makes when many nodes want one blob at once.

Sans-IO (as h11): :class:`SwarmNode` takes events (a local miss, an access check's answer, a message from
another node, a timer, bytes received, a source failing) with an injected ``now`` and returns actions (check
access upstream, send a message, fetch from upstream or from a peer, set a timer). It opens no socket and
reads no clock; the simulation in ``sim/`` and the tests drive it, and a real node wraps it in Twisted
(:mod:`dnsmirror.swarm_node`; docs/architecture.md, "Burst coordination").

- For each digest, the first live node in rendezvous order (:func:`dnsmirror.peers.rendezvous`) is its
  *coordinator*: it need not hold the blob, it only knows who holds or is fetching it.
- A node asks anyone only after its own client's credentials were checked upstream (:class:`CheckAccess`
  comes first). The first asker gets the *fill lease* and fetches from upstream with its own client's
  credentials; later askers are offered a holder (filling or complete) with a free upload slot, and
  register as holders themselves once bytes arrive, so a burst spreads as a tree, at most
  ``max_uploads`` streams of one blob per node.
- A lease holder that stops renewing loses the lease to the next asker (offset kept: upstream with a
  range from the byte reached); a coordinator that does not answer is skipped for the next node in
  rendezvous order; a holder that dies, stalls or lies costs a short timeout, then the next holder,
  then upstream.
- No credential crosses nodes: messages carry only digests, node addresses, offsets and flags, and
  refuse anything else when built (:func:`_check_fields`).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from dnsmirror.config import HostPort
from dnsmirror.peers import rendezvous

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


class Outcome(enum.Enum):
    """How a transfer between two nodes ended (or why a reserved one never started)."""

    DONE = "done"
    DIED = "died"  # the other end closed or could not be reached
    STALLED = "stalled"  # no byte for stall_timeout
    LIED = "lied"  # the bytes did not match the digest
    REFUSED = "refused"  # the holder had no free upload slot
    UNUSED = "unused"  # an offer or a lease that arrived after the asker had moved on


class TimerKind(enum.Enum):
    ASK = "ask"  # the coordinator's answer is due
    RETRY = "retry"  # ask again after a Wait
    STALL = "stall"  # a peer source must have sent a byte by now
    HEARTBEAT = "heartbeat"  # tell the coordinator we still hold or fetch the blob


@functools.lru_cache(maxsize=65536)
def _is_address(node: HostPort) -> bool:
    try:
        ipaddress.ip_address(node.host)
    except (TypeError, ValueError):
        return False
    return isinstance(node.port, int) and 0 < node.port < 65536


def _check_fields(obj: object) -> None:
    """Refuse any value a credential could hide in: digests must be digests, nodes addresses."""
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if f.name == "digest":
            if not (isinstance(value, str) and _SHA256.fullmatch(value)):
                raise ValueError(f"{type(obj).__name__}.digest: not a sha256 digest: {value!r:.80}")
        elif isinstance(value, HostPort):
            if not _is_address(value):
                raise ValueError(f"{type(obj).__name__}.{f.name}: not a node address: {value!r:.80}")
        elif value is None or isinstance(value, Outcome | bool | int | float):
            pass
        else:
            raise ValueError(f"{type(obj).__name__}.{f.name}: {type(value).__name__} may not cross nodes")


# ---- messages between nodes (what crosses the network; the sender is the authenticated peer) ----

@dataclass(frozen=True)
class Ask:
    """Asker -> coordinator: I miss ``digest`` (my client may read it) and hold its first ``offset`` bytes."""

    digest: str
    offset: int = 0

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class Lease:
    """Coordinator -> asker: you hold the fill lease; fetch upstream from ``offset`` with your client's
    credentials."""

    digest: str
    offset: int = 0

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class Offer:
    """Coordinator -> asker: pull from ``holder``, which has an upload slot reserved for you."""

    digest: str
    holder: HostPort

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class Wait:
    """Coordinator -> asker: a fill is under way but every holder is busy; ask again after ``retry_after``
    s."""

    digest: str
    retry_after: float

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class Register:
    """Holder -> coordinator (first byte from a new source, every heartbeat, completion): I hold ``offset``
    bytes from ``source`` (None: upstream) and upload to ``uploads`` nodes now."""

    digest: str
    source: HostPort | None
    offset: int
    complete: bool
    uploads: int = 0

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class Ack:
    """Coordinator -> holder: registration noted (its absence tells the holder the coordinator is gone)."""

    digest: str

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class Release:
    """Either end -> coordinator: the transfer of ``digest`` from ``source`` (None: upstream, i.e. the lease)
    to ``receiver`` ended with ``outcome``; frees the slot, and drops a source that died, stalled or lied."""

    digest: str
    receiver: HostPort
    source: HostPort | None
    outcome: Outcome

    def __post_init__(self) -> None:
        _check_fields(self)


Message = Ask | Lease | Offer | Wait | Register | Ack | Release


# ---- events a node is given ----

@dataclass(frozen=True)
class Wanted:
    """A local client asked for ``digest`` and this node has none of it."""

    digest: str


@dataclass(frozen=True)
class AccessChecked:
    """Upstream answered the access check made with the local client's credentials."""

    digest: str
    allowed: bool


@dataclass(frozen=True)
class MessageReceived:
    sender: HostPort
    message: Message


@dataclass(frozen=True)
class TimerFired:
    digest: str
    kind: TimerKind


@dataclass(frozen=True)
class BytesReceived:
    """The current source has delivered the first ``offset`` bytes (the first such event: receiving began)."""

    digest: str
    offset: int


@dataclass(frozen=True)
class Completed:
    """The whole blob arrived and matched its digest."""

    digest: str


@dataclass(frozen=True)
class SourceFailed:
    """The current source died, stalled or lied (or, for upstream, answered an error) at ``offset``."""

    digest: str
    offset: int
    outcome: Outcome


@dataclass(frozen=True)
class UploadRequested:
    """``receiver`` asks this node for ``digest``."""

    digest: str
    receiver: HostPort


@dataclass(frozen=True)
class UploadEnded:
    digest: str
    receiver: HostPort
    outcome: Outcome


@dataclass(frozen=True)
class Unreachable:
    """A message to ``node`` could not be delivered (refused, or a node that does not speak this protocol)."""

    node: HostPort


@dataclass(frozen=True)
class Abandoned:
    """The local transfer of ``digest`` ended for good without a whole blob (the fill failed, or the local
    node took another way); ``outcome`` says how its current source ended. The pull is forgotten."""

    digest: str
    outcome: Outcome


Event = (Wanted | AccessChecked | MessageReceived | TimerFired | BytesReceived | Completed | SourceFailed
         | UploadRequested | UploadEnded | Unreachable | Abandoned)


# ---- actions a node asks its I/O layer to take ----

@dataclass(frozen=True)
class CheckAccess:
    """HEAD the digest upstream with the local client's credentials (they stay in the I/O layer)."""

    digest: str


@dataclass(frozen=True)
class PassRefusal:
    """Give the local client upstream's refusal; nobody else is asked."""

    digest: str


@dataclass(frozen=True)
class Send:
    to: HostPort
    message: Message


@dataclass(frozen=True)
class SetTimer:
    """Deliver ``TimerFired(digest, kind)`` at ``at`` (a timer fired early or superseded is ignored)."""

    digest: str
    kind: TimerKind
    at: float


@dataclass(frozen=True)
class FetchUpstream:
    """Fetch from upstream with the local client's credentials, from ``offset`` (a Range when not 0)."""

    digest: str
    offset: int


@dataclass(frozen=True)
class FetchPeer:
    """Fetch from ``holder`` from ``offset``; the holder serves what it has and streams the rest as it
    comes."""

    digest: str
    holder: HostPort
    offset: int


@dataclass(frozen=True)
class Abort:
    """Close the transfer from the current source (it stalled); a new source follows."""

    digest: str


@dataclass(frozen=True)
class FailPull:
    """Upstream itself failed: the client gets the error it would get without a mirror."""

    digest: str


@dataclass(frozen=True)
class AcceptUpload:
    digest: str
    receiver: HostPort


@dataclass(frozen=True)
class RejectUpload:
    """No free upload slot (or nothing to serve): the receiver releases the offer and asks again."""

    digest: str
    receiver: HostPort


Action = (CheckAccess | PassRefusal | Send | SetTimer | FetchUpstream | FetchPeer | Abort | FailPull
          | AcceptUpload | RejectUpload)


@dataclass(frozen=True)
class SwarmSettings:
    """Limits and timeouts of burst coordination (seconds)."""

    max_uploads: int = 4  # concurrent uploads of one blob per node (peers.max_uploads)
    ask_timeout: float = 0.5  # a coordinator that does not answer within this is skipped
    stall_timeout: float = 2.0  # a peer source that sends nothing for this long is dropped
    lease_ttl: float = 5.0  # a lease holder that does not renew within this loses the lease
    heartbeat: float = 1.0  # holders re-register this often (renews the lease, detects a lost coordinator)
    retry_after: float = 0.05  # an asker told to wait asks again after this
    patience: float = 10.0  # an asker that has not started receiving after this fetches upstream
    max_peer_failures: int = 3  # sources that died or lied, then upstream
    max_stalls: int = 8  # sources that stalled (often only starved by their own source), then upstream
    max_coordinators: int = 3  # coordinators tried before upstream
    suspect_for: float = 30.0  # a node that failed is not asked or offered for this long
    linger: float = 60.0  # a complete holder keeps registering this long (so a new coordinator learns it)
    scan_limit: int = 32  # holders looked at per ask (bounds the work of one answer)

    def __post_init__(self) -> None:
        if self.max_uploads < 1:
            raise ValueError("max_uploads: must be at least 1")
        if self.heartbeat <= self.ask_timeout:
            raise ValueError(
                "heartbeat: must be longer than ask_timeout (the ack is checked at the next beat)"
            )


class Membership:
    """The nodes of the cluster as one node sees them, with rendezvous orders computed once per digest."""

    def __init__(self, nodes: Iterable[HostPort], max_orders: int = 1024) -> None:
        self.nodes = frozenset(nodes)
        self._orders: OrderedDict[str, tuple[HostPort, ...]] = OrderedDict()
        self._max_orders = max_orders

    def order(self, digest: str) -> tuple[HostPort, ...]:
        """The nodes in rendezvous order for ``digest`` (:func:`dnsmirror.peers.rendezvous`)."""
        order = self._orders.get(digest)
        if order is None:
            order = tuple(rendezvous(digest, self.nodes))
            self._orders[digest] = order
            if len(self._orders) > self._max_orders:
                self._orders.popitem(last=False)
        return order


class Phase(enum.Enum):
    AUTHORISING = "authorising"
    ASKING = "asking"
    WAITING = "waiting"
    FROM_PEER = "from-peer"
    FROM_UPSTREAM = "from-upstream"
    DONE = "done"
    REFUSED = "refused"
    FAILED = "failed"


@dataclass
class Pull:
    """One node's pull of one digest (the asker's side)."""

    digest: str
    phase: Phase = Phase.AUTHORISING
    offset: int = 0
    source: HostPort | None = None  # the peer being pulled from (None: upstream or nobody yet)
    lease: bool = False
    coordinator: HostPort | None = None
    coordinator_failures: int = 0
    peer_failures: int = 0
    stalls: int = 0
    asking_since: float | None = None  # when it last had no source (patience runs from there)
    deadline: float = 0.0  # the ASK or RETRY timer's time
    last_progress: float = 0.0
    registered: bool = False  # with the current source (a new source registers again at its first byte)
    heartbeat_at: float | None = None
    ack_due: float | None = None
    done_at: float | None = None
    uploads: set[HostPort] = field(default_factory=set)


@dataclass
class _Holder:
    source: HostPort | None
    offset: int
    complete: bool
    orphan: bool = False  # its source failed and it has not registered a new one
    receivers: set[HostPort] = field(default_factory=set)
    last_seen: float = 0.0  # its last registration (a holder that still registers is alive)
    # what it said at its last registration (other coordinators may have sent it askers)
    reported_uploads: int = 0
    full: bool = False  # it refused an asker; not offered until it registers again


@dataclass
class _LeaseState:
    holder: HostPort
    expires: float


@dataclass
class _DigestView:
    """What a coordinator knows of one digest."""

    lease: _LeaseState | None = None
    holders: dict[HostPort, _Holder] = field(default_factory=dict)
    free_complete: dict[HostPort, None] = field(default_factory=dict)  # insertion-ordered sets
    free_filling: dict[HostPort, None] = field(default_factory=dict)
    suspects: dict[HostPort, float] = field(default_factory=dict)
    avoid: dict[HostPort, HostPort] = field(default_factory=dict)  # asker -> the source it last gave up on
    complete: int = 0  # how many holders have all of it
    created: float = 0.0
    last_activity: float = 0.0


class SwarmNode:
    """One node's burst decisions, both as asker/holder and as coordinator of the digests it ranks first."""

    def __init__(self, me: HostPort, membership: Membership, settings: SwarmSettings | None = None) -> None:
        self.me = me
        self.membership = membership
        self.settings = settings or SwarmSettings()
        self.pulls: dict[str, Pull] = {}
        self.coordinated: dict[str, _DigestView] = {}
        self._suspects: dict[HostPort, float] = {}  # nodes that failed to answer, until when

    # ---- entry point ----

    def handle(self, event: Event, now: float) -> list[Action]:
        """The actions ``event`` calls for at ``now``."""
        match event:
            case Wanted(digest):
                return self._wanted(digest, now)
            case AccessChecked(digest, allowed):
                return self._access_checked(digest, allowed, now)
            case MessageReceived(sender, message):
                return self._message(sender, message, now)
            case TimerFired(digest, kind):
                return self._timer(digest, kind, now)
            case BytesReceived(digest, offset):
                return self._bytes(digest, offset, now)
            case Completed(digest):
                return self._completed(digest, now)
            case SourceFailed(digest, offset, outcome):
                return self._source_failed(digest, offset, outcome, now)
            case UploadRequested(digest, receiver):
                return self._upload_requested(digest, receiver)
            case UploadEnded(digest, receiver, outcome):
                return self._upload_ended(digest, receiver, outcome, now)
            case Unreachable(node):
                return self._unreachable(node, now)
            case Abandoned(digest, outcome):
                return self._abandoned(digest, outcome, now)
        raise TypeError(f"not a swarm event: {event!r}")

    def coordinator_for(self, digest: str, now: float) -> HostPort | None:
        """The first node in rendezvous order that this node does not suspect (itself counts as live)."""
        for node in self.membership.order(digest):
            if node == self.me or self._suspects.get(node, 0.0) <= now:
                return node
        return None

    # ---- the asker and holder ----

    def _wanted(self, digest: str, now: float) -> list[Action]:
        pull = self.pulls.get(digest)
        if pull is not None and pull.phase not in (Phase.REFUSED, Phase.FAILED, Phase.DONE):
            return []  # already pulling: the local single-flight joins it
        # (a done pull wanted again: the local copy is gone, evicted or damaged; it is pulled anew)
        self.pulls[digest] = Pull(digest)
        return [CheckAccess(digest)]

    def _unreachable(self, node: HostPort, now: float) -> list[Action]:
        """Skip ``node`` at once (no need to wait for the ask timeout) and re-ask the pulls that asked it."""
        if node == self.me:
            return []
        self._suspect(node, now)
        actions: list[Action] = []
        for pull in self.pulls.values():
            if pull.phase is Phase.ASKING and pull.coordinator == node:
                pull.coordinator_failures += 1
                actions += self._ask(pull, now)
        return actions

    def _abandoned(self, digest: str, outcome: Outcome, now: float) -> list[Action]:
        pull = self.pulls.get(digest)
        if pull is None or pull.phase is Phase.DONE:
            return []
        del self.pulls[digest]
        if pull.coordinator is None:
            return []
        if pull.phase is Phase.FROM_PEER and pull.source is not None:
            if outcome in (Outcome.DIED, Outcome.LIED):
                self._suspect(pull.source, now)
            return [Send(pull.coordinator, Release(digest, self.me, pull.source, outcome))]
        if pull.phase is Phase.FROM_UPSTREAM and (pull.lease or pull.registered):
            # hands the lease on, and drops this node as a holder of what it no longer has
            return [Send(pull.coordinator, Release(digest, self.me, None, Outcome.DIED))]
        return []

    def _access_checked(self, digest: str, allowed: bool, now: float) -> list[Action]:
        pull = self.pulls.get(digest)
        if pull is None or pull.phase is not Phase.AUTHORISING:
            return []
        if not allowed:
            pull.phase = Phase.REFUSED
            pull.done_at = now
            return [PassRefusal(digest)]
        return self._ask(pull, now)

    def _ask(self, pull: Pull, now: float) -> list[Action]:
        s = self.settings
        coordinator = self.coordinator_for(pull.digest, now)
        if pull.asking_since is None:
            pull.asking_since = now
        if (coordinator is None or pull.coordinator_failures >= s.max_coordinators
                or now - pull.asking_since >= s.patience):
            return self._upstream(pull, now, lease=False)
        pull.phase = Phase.ASKING
        pull.source = None
        pull.coordinator = coordinator
        pull.deadline = now + s.ask_timeout
        return [
            Send(coordinator, Ask(pull.digest, pull.offset)),
            SetTimer(pull.digest, TimerKind.ASK, pull.deadline),
        ]

    def _upstream(self, pull: Pull, now: float, lease: bool) -> list[Action]:
        pull.registered = False
        pull.phase = Phase.FROM_UPSTREAM
        pull.source = None
        pull.lease = lease
        pull.last_progress = now
        return [FetchUpstream(pull.digest, pull.offset)]

    def _suspect(self, node: HostPort, now: float) -> None:
        if node != self.me:
            self._suspects[node] = now + self.settings.suspect_for

    def _timer(self, digest: str, kind: TimerKind, now: float) -> list[Action]:
        pull = self.pulls.get(digest)
        if pull is None:
            return []
        s = self.settings
        if kind is TimerKind.ASK and pull.phase is Phase.ASKING and now >= pull.deadline:
            assert pull.coordinator is not None
            self._suspect(pull.coordinator, now)
            pull.coordinator_failures += 1
            return self._ask(pull, now)
        if kind is TimerKind.RETRY and pull.phase is Phase.WAITING and now >= pull.deadline:
            return self._ask(pull, now)
        if kind is TimerKind.STALL and pull.phase is Phase.FROM_PEER:
            # the same sum as the timer's: no float drift re-arms it
            due = pull.last_progress + s.stall_timeout
            if now >= due:
                return [Abort(digest), *self._source_failed(digest, pull.offset, Outcome.STALLED, now)]
            return [SetTimer(digest, TimerKind.STALL, due)]
        if kind is TimerKind.HEARTBEAT and pull.heartbeat_at is not None and now >= pull.heartbeat_at:
            pull.heartbeat_at = None  # restarted by the next registration
            lingering = (
                pull.phase is Phase.DONE and pull.done_at is not None and now < pull.done_at + s.linger
            )
            if pull.registered and (pull.phase in (Phase.FROM_PEER, Phase.FROM_UPSTREAM) or lingering):
                if pull.ack_due is not None and now >= pull.ack_due and pull.coordinator is not None:
                    self._suspect(pull.coordinator, now)  # a lost coordinator: register with the next one
                return self._register(pull, now)
        return []

    def _register(self, pull: Pull, now: float) -> list[Action]:
        coordinator = self.coordinator_for(pull.digest, now)
        if coordinator is None:
            return []
        pull.coordinator = coordinator
        pull.registered = True
        pull.ack_due = now + self.settings.ask_timeout
        pull.heartbeat_at = now + self.settings.heartbeat
        register = Register(
            pull.digest, pull.source, pull.offset, pull.phase is Phase.DONE, len(pull.uploads)
        )
        return [Send(coordinator, register), SetTimer(pull.digest, TimerKind.HEARTBEAT, pull.heartbeat_at)]

    def _bytes(self, digest: str, offset: int, now: float) -> list[Action]:
        pull = self.pulls.get(digest)
        if pull is None or pull.phase not in (Phase.FROM_PEER, Phase.FROM_UPSTREAM):
            return []
        pull.offset = max(pull.offset, offset)
        pull.last_progress = now
        pull.asking_since = None
        if not pull.registered:
            return self._register(pull, now)
        return []

    def _completed(self, digest: str, now: float) -> list[Action]:
        pull = self.pulls.get(digest)
        if pull is None or pull.phase not in (Phase.FROM_PEER, Phase.FROM_UPSTREAM):
            return []
        source = pull.source
        pull.phase = Phase.DONE
        pull.done_at = now
        actions: list[Action] = []
        if source is not None and pull.coordinator is not None:
            actions.append(Send(pull.coordinator, Release(digest, self.me, source, Outcome.DONE)))
        return actions + self._register(pull, now)

    def _source_failed(self, digest: str, offset: int, outcome: Outcome, now: float) -> list[Action]:
        pull = self.pulls.get(digest)
        if pull is None:
            return []
        if pull.phase is Phase.FROM_UPSTREAM:
            # upstream's own error reaches the client as it would without a mirror; the lease goes back
            pull.phase = Phase.FAILED
            pull.done_at = now
            actions: list[Action] = [FailPull(digest)]
            if pull.lease and pull.coordinator is not None:
                actions.insert(0, Send(pull.coordinator, Release(digest, self.me, None, Outcome.DIED)))
            return actions
        if pull.phase is not Phase.FROM_PEER or pull.source is None:
            return []
        failed = pull.source
        actions = []
        if pull.coordinator is not None:
            actions.append(Send(pull.coordinator, Release(digest, self.me, failed, outcome)))
        if outcome is Outcome.DIED:
            # not asked as a coordinator either (a stalled one may only be starved)
            self._suspect(failed, now)
        if outcome is Outcome.STALLED:
            pull.stalls += 1
        elif outcome is not Outcome.REFUSED:
            pull.peer_failures += 1
        if outcome is Outcome.LIED:
            pull.offset = 0  # nothing from a lying chain is kept; upstream is the only source trusted now
            return actions + self._upstream(pull, now, lease=False)
        pull.offset = max(pull.offset, offset)
        if pull.peer_failures >= self.settings.max_peer_failures or pull.stalls >= self.settings.max_stalls:
            return actions + self._upstream(pull, now, lease=False)
        return actions + self._ask(pull, now)

    def _upload_requested(self, digest: str, receiver: HostPort) -> list[Action]:
        pull = self.pulls.get(digest)
        serving = pull is not None and (pull.phase is Phase.DONE or (pull.offset > 0 and pull.phase in
                                                                      (Phase.FROM_PEER, Phase.FROM_UPSTREAM)))
        if pull is None or not serving or len(pull.uploads) >= self.settings.max_uploads:
            return [RejectUpload(digest, receiver)]
        pull.uploads.add(receiver)
        return [AcceptUpload(digest, receiver)]

    def _upload_ended(self, digest: str, receiver: HostPort, outcome: Outcome, now: float) -> list[Action]:
        pull = self.pulls.get(digest)
        if pull is None or receiver not in pull.uploads:
            return []
        pull.uploads.discard(receiver)
        coordinator = pull.coordinator or self.coordinator_for(digest, now)
        if coordinator is None:
            return []
        return [Send(coordinator, Release(digest, receiver, self.me, outcome))]

    # ---- replies from a coordinator ----

    def _message(self, sender: HostPort, message: Message, now: float) -> list[Action]:
        match message:
            case Ask(digest, offset):
                return self._coordinate_ask(digest, sender, offset, now)
            case Register():
                return self._coordinate_register(sender, message, now)
            case Release():
                self._coordinate_release(sender, message, now)
                return []
            case Ack(digest):
                pull = self.pulls.get(digest)
                if pull is not None and pull.coordinator == sender:
                    pull.ack_due = None
                return []
        pull = self.pulls.get(message.digest)
        if pull is None or pull.phase is not Phase.ASKING:
            # a late answer: hand back what was reserved for us so the slot or the lease is not lost
            match message:
                case Offer(digest, holder):
                    return [Send(sender, Release(digest, self.me, holder, Outcome.UNUSED))]
                case Lease(digest):
                    return [Send(sender, Release(digest, self.me, None, Outcome.UNUSED))]
            return []
        pull.coordinator = sender
        match message:
            case Lease(digest, _):
                return self._upstream(pull, now, lease=True)
            case Offer(digest, holder):
                pull.registered = False
                pull.phase = Phase.FROM_PEER
                pull.source = holder
                pull.last_progress = now
                return [FetchPeer(digest, holder, pull.offset),
                        SetTimer(digest, TimerKind.STALL, now + self.settings.stall_timeout)]
            case Wait(digest, retry_after):
                pull.phase = Phase.WAITING
                pull.deadline = now + retry_after
                return [SetTimer(digest, TimerKind.RETRY, pull.deadline)]
        return []

    # ---- the coordinator ----

    def _view(self, digest: str, now: float) -> _DigestView:
        view = self.coordinated.get(digest)
        if view is None:
            view = self.coordinated[digest] = _DigestView(created=now)
        view.last_activity = now
        return view

    def lease_holder(self, digest: str) -> HostPort | None:
        """Who holds the fill lease of ``digest`` in this coordinator's view."""
        view = self.coordinated.get(digest)
        return view.lease.holder if view is not None and view.lease is not None else None

    def _refresh_free(self, view: _DigestView, node: HostPort) -> None:
        view.free_complete.pop(node, None)
        view.free_filling.pop(node, None)
        holder = view.holders.get(node)
        busy = max(len(holder.receivers), holder.reported_uploads) if holder is not None else 0
        if holder is None or holder.orphan or holder.full or busy >= self.settings.max_uploads:
            return
        (view.free_complete if holder.complete else view.free_filling)[node] = None

    def _drop_holder(self, view: _DigestView, node: HostPort, now: float) -> None:
        view.suspects[node] = now + self.settings.suspect_for
        holder = view.holders.pop(node, None)
        view.free_complete.pop(node, None)
        view.free_filling.pop(node, None)
        if view.lease is not None and view.lease.holder == node:
            view.lease = None  # handed on to the next asker
        if holder is None:
            return
        view.complete -= holder.complete
        for receiver in holder.receivers:
            child = view.holders.get(receiver)
            if child is not None and child.source == node:
                child.orphan = True
                self._refresh_free(view, receiver)
        if holder.source is not None and holder.source in view.holders:
            view.holders[holder.source].receivers.discard(node)
            self._refresh_free(view, holder.source)

    def _feeds_from_live_chain(self, view: _DigestView, candidate: HostPort, asker: HostPort) -> bool:
        """True when ``candidate``'s bytes come, through live holders, from a complete copy or the lease,
        and not through ``asker`` (which would wait for itself)."""
        node: HostPort | None = candidate
        for _ in range(64):
            if node == asker or node is None:
                return False
            holder = view.holders.get(node)
            if holder is None or holder.orphan:
                return False
            if holder.complete:
                return True
            if holder.source is None:
                return True  # fetching from upstream (the lease, or a node that fell back)
            node = holder.source
        return False

    def _pick(self, view: _DigestView, asker: HostPort, now: float) -> HostPort | None:
        looked = 0
        for free in (view.free_complete, view.free_filling):
            for node in list(free):
                if looked >= self.settings.scan_limit:
                    return None
                looked += 1
                if node == asker or view.suspects.get(node, 0.0) > now or view.avoid.get(asker) == node:
                    continue
                if self._feeds_from_live_chain(view, node, asker):
                    return node
        return None

    def _coordinate_ask(self, digest: str, asker: HostPort, offset: int, now: float) -> list[Action]:
        s = self.settings
        view = self._view(digest, now)
        view.suspects.pop(asker, None)
        lease = view.lease
        if lease is not None and lease.holder == asker:
            lease.expires = now + s.lease_ttl
            return [Send(asker, Lease(digest, offset))]
        if lease is not None and lease.expires <= now:
            self._drop_holder(view, lease.holder, now)
        mine = view.holders.get(asker)
        if mine is not None and not mine.complete:
            mine.orphan = True  # it asks again, so it lost its source
            self._refresh_free(view, asker)
        holder = self._pick(view, asker, now)
        if holder is not None:
            view.holders[holder].receivers.add(asker)
            self._refresh_free(view, holder)
            return [Send(asker, Offer(digest, holder))]
        # a node that took over from a lost coordinator first lets the holders re-register (one heartbeat)
        taking_over = (self.membership.order(digest)[:1] != (self.me,)
                       and now - view.created < s.heartbeat + s.ask_timeout)
        if view.lease is None and not view.complete and not taking_over:
            view.lease = _LeaseState(asker, now + s.lease_ttl)
            return [Send(asker, Lease(digest, offset))]
        return [Send(asker, Wait(digest, s.retry_after))]

    def _coordinate_register(self, node: HostPort, register: Register, now: float) -> list[Action]:
        view = self._view(register.digest, now)
        view.suspects.pop(node, None)
        holder = view.holders.get(node)
        if holder is None:
            holder = view.holders[node] = _Holder(register.source, register.offset, complete=False)
        elif holder.source != register.source:
            old = view.holders.get(holder.source) if holder.source is not None else None
            if old is not None:
                old.receivers.discard(node)
                self._refresh_free(view, holder.source)  # type: ignore[arg-type]
        holder.source = register.source
        holder.last_seen = now
        holder.reported_uploads = register.uploads
        holder.full = False
        holder.offset = max(holder.offset, register.offset)
        if register.complete and not holder.complete:
            holder.complete = True
            view.complete += 1
        holder.orphan = False
        if register.source is not None and register.source in view.holders:
            view.holders[register.source].receivers.add(node)  # a resumed transfer keeps its reservation
            self._refresh_free(view, register.source)
        if view.lease is not None and view.lease.holder == node:
            if register.complete:
                view.lease = None
            else:
                view.lease.expires = now + self.settings.lease_ttl
        elif register.source is None and view.lease is None and not register.complete:
            view.lease = _LeaseState(node, now + self.settings.lease_ttl)  # a fill this view did not grant
        self._refresh_free(view, node)
        return [Send(node, Ack(register.digest))]

    def _coordinate_release(self, sender: HostPort, release: Release, now: float) -> None:
        view = self._view(release.digest, now)
        if release.source is None:
            if (
                view.lease is not None
                and view.lease.holder == release.receiver
                and sender == release.receiver
            ):
                view.lease = None
                if release.outcome is not Outcome.UNUSED:
                    self._drop_holder(view, release.receiver, now)
            return
        source = view.holders.get(release.source)
        if source is not None:
            source.receivers.discard(release.receiver)
            if release.outcome is Outcome.REFUSED and sender == release.receiver:
                source.full = True
            self._refresh_free(view, release.source)
        if sender == release.source and release.outcome is Outcome.DIED:
            # the uploader lost its receiver: not offered until it asks or registers again
            self._drop_holder(view, release.receiver, now)
            return
        if sender != release.receiver or release.outcome not in (Outcome.DIED, Outcome.STALLED, Outcome.LIED):
            return
        view.avoid[release.receiver] = release.source
        # a source that stalled but still registers is alive and starved by its own source: keep it (a
        # complete one has no source to starve it: it is broken)
        alive = source is not None and now - source.last_seen <= 2 * self.settings.heartbeat
        starved = alive and not source.complete  # type: ignore[union-attr]
        if release.outcome is not Outcome.STALLED or not starved:
            self._drop_holder(view, release.source, now)

    def forget_idle(self, now: float) -> int:
        """Drop coordinator views idle for ``linger``, pulls ended ``linger`` ago with no upload left, and
        expired suspicions; returns how many views and pulls went (a long-lived node calls it
        periodically)."""
        linger = self.settings.linger
        idle = [d for d, v in self.coordinated.items() if now - v.last_activity > linger]
        for digest in idle:
            del self.coordinated[digest]
        ended = [d for d, p in self.pulls.items()
                 if p.done_at is not None and now - p.done_at > linger and not p.uploads]
        for digest in ended:
            del self.pulls[digest]
        self._suspects = {node: until for node, until in self._suspects.items() if until > now}
        return len(idle) + len(ended)

    # ---- for checks ----

    def upload_count(self, digest: str) -> int:
        """Concurrent uploads of ``digest`` this node has accepted and not yet seen end."""
        pull = self.pulls.get(digest)
        return len(pull.uploads) if pull is not None else 0
