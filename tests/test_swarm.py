"""Burst coordination (dnsmirror/swarm.py): the decisions, one event at a time, and invariants under random
schedules of messages, timers, transfers and node deaths."""

from __future__ import annotations

import dataclasses
import random
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsmirror import swarm
from dnsmirror.config import HostPort
from dnsmirror.peers import rendezvous

D = "sha256:" + "ab" * 32
K = 4


def addr(i: int) -> HostPort:
    return HostPort(f"10.0.0.{i + 1}", 5001)


def make(n: int, **overrides) -> list[swarm.SwarmNode]:
    membership = swarm.Membership(addr(i) for i in range(n))
    config = swarm.SwarmSettings(**{"max_uploads": K, **overrides})
    return [swarm.SwarmNode(addr(i), membership, config) for i in range(n)]


def sends(actions, kind=None):
    return [a for a in actions if isinstance(a, swarm.Send) and (kind is None or isinstance(a.message, kind))]


def ask_granted(node: swarm.SwarmNode, now: float = 0.0) -> list:
    """A local miss whose access check passed: what the node does next."""
    assert node.handle(swarm.Wanted(D), now) == [swarm.CheckAccess(D)]
    return node.handle(swarm.AccessChecked(D, True), now)


def coordinator_of(nodes: list[swarm.SwarmNode]) -> swarm.SwarmNode:
    first = rendezvous(D, [n.me for n in nodes])[0]
    return next(n for n in nodes if n.me == first)


def reply(coordinator: swarm.SwarmNode, sender: swarm.SwarmNode, message, now: float = 0.0):
    """Deliver ``message`` from ``sender`` to ``coordinator``; return the one answer addressed to
    ``sender``."""
    answers = sends(coordinator.handle(swarm.MessageReceived(sender.me, message), now))
    assert [a.to for a in answers] == [sender.me] * len(answers)
    return answers[0].message if answers else None


# ---- what may cross nodes ----

ALLOWED = {str, int, float, bool, HostPort, HostPort | None, swarm.Outcome}


@pytest.mark.parametrize("message", typing.get_args(swarm.Message))
def test_messages_have_no_field_that_could_carry_a_credential(message):
    hints = typing.get_type_hints(message)
    for f in dataclasses.fields(message):
        assert hints[f.name] in ALLOWED, f"{message.__name__}.{f.name}: {hints[f.name]}"
        if hints[f.name] is str:
            assert f.name == "digest"


@pytest.mark.parametrize("build", [
    lambda: swarm.Ask("Bearer eyJhbGciOi"),
    lambda: swarm.Ask(D + "\nAuthorization: Basic dXNlcjpwYXNz"),
    lambda: swarm.Offer(D, HostPort("Basic dXNlcjpwYXNz", 5001)),
    lambda: swarm.Register(D, HostPort("10.0.0.1", 0), 0, False),
    lambda: swarm.Release(D, addr(0), None, "token"),
    lambda: swarm.Wait(D, b"secret"),
])
def test_a_message_refuses_anything_but_digests_addresses_and_numbers(build):
    with pytest.raises(ValueError):
        build()


def test_access_is_checked_upstream_before_anyone_is_asked():
    node = make(3)[0]
    assert node.handle(swarm.Wanted(D), 0.0) == [swarm.CheckAccess(D)]
    assert node.handle(swarm.AccessChecked(D, False), 0.1) == [swarm.PassRefusal(D)]
    # a refused client never makes the node ask, fetch or register
    for kind in swarm.TimerKind:
        assert node.handle(swarm.TimerFired(D, kind), 100.0) == []


# ---- the coordinator ----

def test_first_asker_gets_the_lease_later_ones_wait_then_are_offered_the_filling_holder():
    nodes = make(6)
    coordinator = coordinator_of(nodes)
    first, second, third = [n for n in nodes if n is not coordinator][:3]
    ask = sends(ask_granted(first), swarm.Ask)[0]
    assert ask.to == coordinator.me
    assert reply(coordinator, first, ask.message) == swarm.Lease(D, 0)
    assert first.handle(swarm.MessageReceived(coordinator.me, swarm.Lease(D, 0)), 0.0) == [
        swarm.FetchUpstream(D, 0)
    ]
    # the lease holder has no byte yet: the second asker waits (and is not given a second lease)
    assert isinstance(reply(coordinator, second, swarm.Ask(D)), swarm.Wait)
    assert coordinator.lease_holder(D) == first.me
    register = sends(first.handle(swarm.BytesReceived(D, 1000), 0.2), swarm.Register)[0]
    assert register.message == swarm.Register(D, None, 1000, False)
    assert reply(coordinator, first, register.message, 0.2) == swarm.Ack(D)
    assert reply(coordinator, third, swarm.Ask(D), 0.3) == swarm.Offer(D, first.me)


def test_a_holder_is_offered_to_at_most_max_uploads_askers_and_receivers_become_holders():
    nodes = make(12)
    coordinator = coordinator_of(nodes)
    others = [n for n in nodes if n is not coordinator]
    lease_holder, askers = others[0], others[1:]
    assert reply(coordinator, lease_holder, swarm.Ask(D)) == swarm.Lease(D)
    reply(coordinator, lease_holder, swarm.Register(D, None, 10, False))
    answers = [reply(coordinator, a, swarm.Ask(D)) for a in askers[:K + 1]]
    assert answers[:K] == [swarm.Offer(D, lease_holder.me)] * K
    assert isinstance(answers[K], swarm.Wait)
    # a receiver that registers (its first byte arrived) is offered in turn: the burst spreads as a tree
    reply(coordinator, askers[0], swarm.Register(D, lease_holder.me, 5, False))
    assert reply(coordinator, askers[K], swarm.Ask(D)) == swarm.Offer(D, askers[0].me)
    # a release frees the slot
    coordinator.handle(swarm.MessageReceived(askers[1].me, swarm.Release(D, askers[1].me, lease_holder.me,
                                                                         swarm.Outcome.DONE)), 1.0)
    later = [reply(coordinator, a, swarm.Ask(D), 1.0) for a in askers[K + 1:K + 5]]
    assert sorted(o.holder.host for o in later) == sorted(
        [askers[0].me.host] * (K - 1) + [lease_holder.me.host]
    )


def test_complete_holders_are_preferred_and_no_lease_is_given_while_one_exists():
    nodes = make(16)
    coordinator = coordinator_of(nodes)
    a, b, c, *rest = [n for n in nodes if n is not coordinator]
    reply(coordinator, a, swarm.Ask(D))
    reply(coordinator, a, swarm.Register(D, None, 10, False))
    reply(coordinator, b, swarm.Ask(D))
    reply(coordinator, b, swarm.Register(D, a.me, 10, False))
    reply(coordinator, b, swarm.Register(D, a.me, 100, True))
    assert reply(coordinator, c, swarm.Ask(D)) == swarm.Offer(D, b.me)
    reply(coordinator, a, swarm.Register(D, None, 100, True))
    assert coordinator.lease_holder(D) is None
    for asker in rest[:K * 2 - 2]:
        assert isinstance(reply(coordinator, asker, swarm.Ask(D)), swarm.Offer)
    last = rest[K * 2 - 2]
    # all slots taken: wait, never a lease
    assert isinstance(reply(coordinator, last, swarm.Ask(D)), swarm.Wait)


def test_a_dead_lease_holder_hands_the_lease_to_the_next_asker_with_its_offset():
    nodes = make(6)
    coordinator = coordinator_of(nodes)
    holder, child = [n for n in nodes if n is not coordinator][:2]
    reply(coordinator, holder, swarm.Ask(D))
    reply(coordinator, holder, swarm.Register(D, None, 10, False))
    ask = sends(ask_granted(child), swarm.Ask)[0]
    offer = reply(coordinator, child, ask.message)
    assert child.handle(swarm.MessageReceived(coordinator.me, offer), 0.0)[0] == swarm.FetchPeer(
        D, holder.me, 0
    )
    child.handle(swarm.BytesReceived(D, 500), 0.1)
    actions = child.handle(swarm.SourceFailed(D, 500, swarm.Outcome.DIED), 0.2)
    release, again = sends(actions)
    assert release.message == swarm.Release(D, child.me, holder.me, swarm.Outcome.DIED)
    assert again.message == swarm.Ask(D, 500)
    coordinator.handle(swarm.MessageReceived(child.me, release.message), 0.2)
    lease = reply(coordinator, child, again.message, 0.2)
    assert lease == swarm.Lease(D, 500)
    assert child.handle(swarm.MessageReceived(coordinator.me, lease), 0.2) == [swarm.FetchUpstream(D, 500)]


def test_a_silent_lease_holder_loses_the_lease_after_its_ttl():
    nodes = make(4, lease_ttl=5.0)
    coordinator = coordinator_of(nodes)
    silent, asker = [n for n in nodes if n is not coordinator][:2]
    reply(coordinator, silent, swarm.Ask(D), 0.0)
    assert isinstance(reply(coordinator, asker, swarm.Ask(D), 4.9), swarm.Wait)
    assert reply(coordinator, asker, swarm.Ask(D), 5.1) == swarm.Lease(D)
    assert coordinator.lease_holder(D) == asker.me


def test_an_orphan_is_never_offered_its_own_descendant():
    nodes = make(5)
    coordinator = coordinator_of(nodes)
    root, mid, leaf = [n for n in nodes if n is not coordinator][:3]
    reply(coordinator, root, swarm.Ask(D))
    reply(coordinator, root, swarm.Register(D, None, 10, False))
    reply(coordinator, mid, swarm.Ask(D))
    reply(coordinator, mid, swarm.Register(D, root.me, 5, False))
    reply(coordinator, leaf, swarm.Ask(D))
    reply(coordinator, leaf, swarm.Register(D, mid.me, 2, False))
    # root dies; mid reports it and asks again: leaf (fed by mid) has free slots but would wait for mid itself
    coordinator.handle(
        swarm.MessageReceived(mid.me, swarm.Release(D, mid.me, root.me, swarm.Outcome.DIED)), 1.0
    )
    assert reply(coordinator, mid, swarm.Ask(D, 5), 1.0) == swarm.Lease(D, 5)


def test_a_stalled_source_is_aborted_and_the_next_one_asked():
    nodes = make(4, stall_timeout=2.0)
    node = nodes[0]
    coordinator = node.coordinator_for(D, 0.0)
    ask_granted(node)
    node.handle(swarm.MessageReceived(coordinator, swarm.Offer(D, addr(3))), 0.0)
    node.handle(swarm.BytesReceived(D, 100), 1.0)
    assert node.handle(swarm.TimerFired(D, swarm.TimerKind.STALL), 2.0) == [
        swarm.SetTimer(D, swarm.TimerKind.STALL, 3.0)
    ]
    actions = node.handle(swarm.TimerFired(D, swarm.TimerKind.STALL), 3.0)
    assert actions[0] == swarm.Abort(D)
    assert [s.message for s in sends(actions)] == [swarm.Release(D, node.me, addr(3), swarm.Outcome.STALLED),
                                                   swarm.Ask(D, 100)]


def test_a_lying_source_sends_the_node_to_upstream_from_the_start():
    node = make(4)[0]
    ask_granted(node)
    node.handle(swarm.MessageReceived(node.coordinator_for(D, 0.0), swarm.Offer(D, addr(2))), 0.0)
    node.handle(swarm.BytesReceived(D, 100), 0.5)
    actions = node.handle(swarm.SourceFailed(D, 100, swarm.Outcome.LIED), 1.0)
    assert actions[-1] == swarm.FetchUpstream(D, 0)


def test_after_max_peer_failures_the_node_resumes_upstream_from_the_byte_reached():
    node = make(6, max_peer_failures=2)[0]
    coordinator = node.coordinator_for(D, 0.0)
    ask_granted(node)
    node.handle(swarm.MessageReceived(coordinator, swarm.Offer(D, addr(2))), 0.0)
    node.handle(swarm.SourceFailed(D, 300, swarm.Outcome.DIED), 0.1)
    node.handle(swarm.MessageReceived(coordinator, swarm.Offer(D, addr(3))), 0.1)
    actions = node.handle(swarm.SourceFailed(D, 700, swarm.Outcome.DIED), 0.2)
    assert actions[-1] == swarm.FetchUpstream(D, 700)


def test_an_unanswering_coordinator_is_skipped_for_the_next_in_rendezvous_order_then_upstream():
    nodes = make(6, max_coordinators=2)
    order = rendezvous(D, [n.me for n in nodes])
    node = next(n for n in nodes if n.me not in order[:2])
    assert sends(ask_granted(node))[0].to == order[0]
    actions = node.handle(swarm.TimerFired(D, swarm.TimerKind.ASK), 0.5)
    assert sends(actions)[0].to == order[1]
    assert node.handle(swarm.TimerFired(D, swarm.TimerKind.ASK), 1.0) == [swarm.FetchUpstream(D, 0)]


def test_a_timer_that_is_not_due_does_nothing():
    node = make(4)[0]
    ask_granted(node)
    assert node.handle(swarm.TimerFired(D, swarm.TimerKind.ASK), 0.1) == []


def test_a_holder_whose_heartbeat_goes_unanswered_registers_with_the_next_coordinator():
    nodes = make(6)
    order = rendezvous(D, [n.me for n in nodes])
    node = next(n for n in nodes if n.me not in order[:2])
    ask_granted(node)
    node.handle(swarm.MessageReceived(order[0], swarm.Lease(D)), 0.0)
    first = sends(node.handle(swarm.BytesReceived(D, 10), 0.1), swarm.Register)[0]
    assert first.to == order[0]
    beat = sends(node.handle(swarm.TimerFired(D, swarm.TimerKind.HEARTBEAT), 1.1), swarm.Register)[0]
    assert beat.to == order[1]
    assert beat.message == swarm.Register(D, None, 10, False)


def test_the_uploader_refuses_more_than_max_uploads_and_releases_when_an_upload_ends():
    node = make(8)[0]
    ask_granted(node)
    node.handle(swarm.MessageReceived(node.coordinator_for(D, 0.0), swarm.Lease(D)), 0.0)
    # no byte yet
    assert node.handle(swarm.UploadRequested(D, addr(5)), 0.0) == [swarm.RejectUpload(D, addr(5))]
    node.handle(swarm.BytesReceived(D, 10), 0.1)
    answers = [node.handle(swarm.UploadRequested(D, addr(i)), 0.2)[0] for i in range(1, K + 2)]
    assert [type(a) for a in answers] == [swarm.AcceptUpload] * K + [swarm.RejectUpload]
    assert node.upload_count(D) == K
    release = sends(node.handle(swarm.UploadEnded(D, addr(1), swarm.Outcome.DONE), 0.3))[0]
    assert release.message == swarm.Release(D, addr(1), node.me, swarm.Outcome.DONE)
    assert node.upload_count(D) == K - 1


def test_a_late_offer_is_handed_back():
    nodes = make(4)
    node = nodes[0]
    ask_granted(node)
    coordinator = node.coordinator_for(D, 0.0)
    node.handle(swarm.MessageReceived(coordinator, swarm.Lease(D)), 0.0)
    late = node.handle(swarm.MessageReceived(coordinator, swarm.Offer(D, addr(3))), 0.1)
    assert [s.message for s in sends(late)] == [swarm.Release(D, node.me, addr(3), swarm.Outcome.UNUSED)]


def test_an_upstream_error_fails_the_pull_as_without_a_mirror_and_returns_the_lease():
    nodes = make(4)
    coordinator = coordinator_of(nodes)
    node = next(n for n in nodes if n is not coordinator)
    ask = sends(ask_granted(node))[0]
    lease = reply(coordinator, node, ask.message)
    node.handle(swarm.MessageReceived(coordinator.me, lease), 0.0)
    actions = node.handle(swarm.SourceFailed(D, 0, swarm.Outcome.DIED), 0.1)
    assert actions[-1] == swarm.FailPull(D)
    coordinator.handle(swarm.MessageReceived(node.me, sends(actions)[0].message), 0.1)
    assert coordinator.lease_holder(D) is None


def test_idle_coordinator_views_and_ended_pulls_are_forgotten():
    nodes = make(3, linger=60.0)
    coordinator = coordinator_of(nodes)
    reply(coordinator, nodes[0], swarm.Ask(D), 0.0)
    assert coordinator.forget_idle(30.0) == 0
    assert coordinator.forget_idle(61.0) == 1
    assert coordinator.coordinated == {}
    refused = nodes[1]
    refused.handle(swarm.Wanted(D), 0.0)
    refused.handle(swarm.AccessChecked(D, False), 1.0)
    assert refused.forget_idle(30.0) == 0
    assert refused.forget_idle(62.0) == 1
    assert refused.pulls == {}


# ---- random schedules ----

CHUNKS = 4


class Cluster:
    """A tiny in-memory network for the decision code: messages delivered in any order, transfers moving one
    chunk at a time, time advancing only to the next timer."""

    def __init__(self, n: int, rnd: random.Random) -> None:
        self.nodes = {n.me: n for n in make(n, heartbeat=1.0, ask_timeout=0.5)}
        self.rnd = rnd
        self.now = 0.0
        self.inbox: list[tuple[HostPort, HostPort, swarm.Message]] = []
        self.work: list[tuple] = []  # access checks and connections under way
        self.timers: list[tuple[float, HostPort, swarm.TimerFired]] = []
        self.transfers: dict[HostPort, HostPort | None] = {}  # receiver -> source (None: upstream)
        self.have = dict.fromkeys(self.nodes, 0)
        self.alive = set(self.nodes)
        self.allowed: set[HostPort] = set()
        self.upstream_fetches = 0
        self.max_uploads_seen = 0

    def apply(self, me: HostPort, actions: list) -> None:
        for action in actions:
            match action:
                case swarm.CheckAccess():
                    self.work.append(("access", me))
                case swarm.Send(to, message):
                    assert me in self.allowed or not isinstance(message, swarm.Ask), (
                        "asked before its access check"
                    )
                    self.inbox.append((to, me, message))
                case swarm.SetTimer(digest, kind, at):
                    self.timers.append((at, me, swarm.TimerFired(digest, kind)))
                case swarm.FetchUpstream(_, offset):
                    self.have[me] = offset // 100
                    self.transfers[me] = None
                    self.upstream_fetches += 1
                case swarm.FetchPeer(_, holder, offset):
                    self.have[me] = offset // 100
                    self.work.append(("connect", me, holder))
                case swarm.Abort():
                    self._end(me, swarm.Outcome.STALLED)
                case swarm.FailPull() | swarm.PassRefusal():
                    raise AssertionError(f"{me} failed its pull")

    def handle(self, me: HostPort, event) -> None:
        if me in self.alive:
            self.apply(me, self.nodes[me].handle(event, self.now))
            for node in self.nodes.values():
                assert node.upload_count(D) <= K

    def _end(self, receiver: HostPort, outcome) -> None:
        source = self.transfers.pop(receiver, None)
        if source is not None:
            self.handle(source, swarm.UploadEnded(D, receiver, outcome))

    def uploads(self, node: HostPort) -> int:
        return sum(1 for s in self.transfers.values() if s == node)

    def start(self) -> None:
        for me in self.nodes:
            self.handle(me, swarm.Wanted(D))

    def kill(self, victim: HostPort) -> None:
        self.alive.discard(victim)
        self._end(victim, swarm.Outcome.DIED)
        for receiver, source in list(self.transfers.items()):
            if source == victim:
                del self.transfers[receiver]
                self.handle(receiver, swarm.SourceFailed(D, self.have[receiver] * 100, swarm.Outcome.DIED))

    def step(self, choice: int) -> bool:
        """One thing happens; False when nothing is left to happen."""
        options = []
        if self.inbox:
            options.append(self._deliver)
        if self.work:
            options.append(self._work)
        movable = [r for r, s in self.transfers.items() if s is None or self.have[s] > self.have[r]]
        if movable:
            options.append(lambda c: self._move(movable[c % len(movable)]))
        if not options:
            return self._tick()
        options[choice % len(options)](choice)
        return True

    def _deliver(self, choice: int) -> None:
        to, sender, message = self.inbox.pop(choice % len(self.inbox))
        self.handle(to, swarm.MessageReceived(sender, message))

    def _work(self, choice: int) -> None:
        job = self.work.pop(choice % len(self.work))
        if job[0] == "access":
            self.allowed.add(job[1])
            self.handle(job[1], swarm.AccessChecked(D, True))
            return
        _, me, holder = job
        if holder not in self.alive:
            self.handle(me, swarm.SourceFailed(D, self.have[me] * 100, swarm.Outcome.DIED))
            return
        answer = self.nodes[holder].handle(swarm.UploadRequested(D, me), self.now)
        if isinstance(answer[0], swarm.AcceptUpload):
            self.transfers[me] = holder
            self.max_uploads_seen = max(self.max_uploads_seen, self.uploads(holder))
        else:
            self.handle(me, swarm.SourceFailed(D, self.have[me] * 100, swarm.Outcome.REFUSED))

    def _move(self, receiver: HostPort) -> None:
        self.have[receiver] += 1
        self.handle(receiver, swarm.BytesReceived(D, self.have[receiver] * 100))
        if self.have[receiver] == CHUNKS:
            self.handle(receiver, swarm.Completed(D))
            self._end(receiver, swarm.Outcome.DONE)

    def _tick(self) -> bool:
        live = [t for t in self.timers if t[1] in self.alive]
        if not live:
            return False
        first = min(live, key=lambda t: t[0])
        self.timers.remove(first)
        self.now = max(self.now, first[0])
        self.handle(first[1], first[2])
        return True

    def unfinished(self) -> list[HostPort]:
        return [me for me in self.alive if self.nodes[me].pulls[D].phase is not swarm.Phase.DONE]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 2**32), kills=st.lists(st.integers(0, 400), max_size=3),
       choices=st.lists(st.integers(0, 1000), min_size=50, max_size=400))
def test_random_schedules_finish_every_live_node_within_the_upload_limit(n, seed, kills, choices):
    cluster = Cluster(n, random.Random(seed))
    cluster.start()
    victims = {when: list(cluster.nodes)[(seed + i) % n] for i, when in enumerate(kills)}
    for step, choice in enumerate(choices):
        if step in victims and len(cluster.alive) > 1:
            cluster.kill(victims[step])
        if not cluster.step(choice):
            break
        # one lease per digest in each coordinator's view, never held by a node it suspects
        for node in cluster.nodes.values():
            view = node.coordinated.get(D)
            if view is not None and view.lease is not None:
                assert view.suspects.get(view.lease.holder, 0.0) <= cluster.now
    for _ in range(20_000):  # then let it settle: bounded, time moves only to the next timer
        if not cluster.unfinished() or not cluster.step(0):
            break
    assert cluster.unfinished() == []
    assert cluster.max_uploads_seen <= K
    if not kills:
        # stable membership and no failure: one upstream fetch, however the messages were ordered,
        # unless an ask outlived its timeout (time moves only when nothing else can happen, so it did not)
        assert cluster.upstream_fetches == 1


# ---- what the simulation taught (each of these once broke a 50-node run with failures) ----

def test_a_refusing_holder_is_not_offered_again_until_it_registers():
    nodes = make(8)
    coordinator = coordinator_of(nodes)
    holder, a, b = [n for n in nodes if n is not coordinator][:3]
    reply(coordinator, holder, swarm.Ask(D))
    reply(coordinator, holder, swarm.Register(D, None, 10, False))
    assert reply(coordinator, a, swarm.Ask(D)) == swarm.Offer(D, holder.me)
    # the holder is full of askers another coordinator sent it
    coordinator.handle(
        swarm.MessageReceived(a.me, swarm.Release(D, a.me, holder.me, swarm.Outcome.REFUSED)), 0.1
    )
    assert isinstance(reply(coordinator, b, swarm.Ask(D), 0.1), swarm.Wait)
    reply(coordinator, holder, swarm.Register(D, None, 20, False, uploads=K), 0.2)
    assert isinstance(reply(coordinator, b, swarm.Ask(D), 0.2), swarm.Wait)  # it says it is full
    reply(coordinator, holder, swarm.Register(D, None, 30, False, uploads=1), 0.3)
    assert reply(coordinator, b, swarm.Ask(D), 0.3) == swarm.Offer(D, holder.me)


def test_a_receiver_whose_uploader_saw_it_die_is_not_offered():
    nodes = make(8)
    coordinator = coordinator_of(nodes)
    root, dead, asker = [n for n in nodes if n is not coordinator][:3]
    reply(coordinator, root, swarm.Ask(D))
    reply(coordinator, root, swarm.Register(D, None, 10, False, uploads=K))  # root is busy
    reply(coordinator, dead, swarm.Register(D, root.me, 5, False))
    coordinator.handle(
        swarm.MessageReceived(root.me, swarm.Release(D, dead.me, root.me, swarm.Outcome.DIED)), 0.5
    )
    assert isinstance(reply(coordinator, asker, swarm.Ask(D), 0.5), swarm.Wait)


def test_a_stalled_source_that_still_registers_is_kept_but_not_offered_to_the_same_asker():
    nodes = make(8)
    coordinator = coordinator_of(nodes)
    root, starved, child, other = [n for n in nodes if n is not coordinator][:4]
    reply(coordinator, root, swarm.Ask(D))
    reply(coordinator, root, swarm.Register(D, None, 10, False, uploads=K))
    reply(coordinator, starved, swarm.Register(D, root.me, 5, False), 1.0)
    coordinator.handle(
        swarm.MessageReceived(child.me, swarm.Release(D, child.me, starved.me, swarm.Outcome.STALLED)), 1.5
    )
    assert isinstance(reply(coordinator, child, swarm.Ask(D, 3), 1.5), swarm.Wait)
    assert reply(coordinator, other, swarm.Ask(D), 1.5) == swarm.Offer(D, starved.me)


def test_a_complete_holder_that_stalls_is_dropped_and_the_asker_gets_the_lease_with_its_offset():
    nodes = make(4)
    coordinator = coordinator_of(nodes)
    holder, asker = [n for n in nodes if n is not coordinator][:2]
    assert reply(coordinator, holder, swarm.Register(D, None, 100, True), 1.0) == swarm.Ack(D)
    assert reply(coordinator, asker, swarm.Ask(D), 1.0) == swarm.Offer(D, holder.me)
    # nothing starves a complete copy: a stall means it is broken, even while it still registers
    coordinator.handle(
        swarm.MessageReceived(asker.me, swarm.Release(D, asker.me, holder.me, swarm.Outcome.STALLED)), 1.5
    )
    assert reply(coordinator, asker, swarm.Ask(D, 40), 1.5) == swarm.Lease(D, 40)


def test_a_node_that_took_over_from_a_lost_coordinator_lets_holders_register_before_giving_a_lease():
    nodes = make(6, heartbeat=1.0, ask_timeout=0.5)
    order = rendezvous(D, [n.me for n in nodes])
    successor = next(n for n in nodes if n.me == order[1])
    holder, asker = [n for n in nodes if n.me not in order[:2]][:2]
    assert isinstance(reply(successor, asker, swarm.Ask(D), 10.0), swarm.Wait)
    # the fill the old coordinator granted
    reply(successor, holder, swarm.Register(D, None, 100, False), 10.8)
    assert reply(successor, asker, swarm.Ask(D), 10.9) == swarm.Offer(D, holder.me)
    assert successor.lease_holder(D) == holder.me


def test_a_new_source_is_registered_at_its_first_byte():
    node = make(6)[0]
    coordinator = node.coordinator_for(D, 0.0)
    ask_granted(node)
    node.handle(swarm.MessageReceived(coordinator, swarm.Offer(D, addr(2))), 0.0)
    assert sends(node.handle(swarm.BytesReceived(D, 100), 0.1), swarm.Register)[0].message.source == addr(2)
    node.handle(swarm.SourceFailed(D, 100, swarm.Outcome.DIED), 0.2)
    node.handle(swarm.MessageReceived(coordinator, swarm.Offer(D, addr(3))), 0.2)
    register = sends(node.handle(swarm.BytesReceived(D, 200), 0.3), swarm.Register)[0].message
    assert register == swarm.Register(D, addr(3), 200, False, 0)
    # the heartbeat armed for the first registration is stale; the new one beats on
    assert node.handle(swarm.TimerFired(D, swarm.TimerKind.HEARTBEAT), 1.1) == []
    assert sends(node.handle(swarm.TimerFired(D, swarm.TimerKind.HEARTBEAT), 1.3), swarm.Register)


def test_an_unreachable_coordinator_is_skipped_at_once_for_the_next_in_rendezvous_order():
    nodes = make(4)
    order = rendezvous(D, [n.me for n in nodes])
    asker = next(n for n in nodes if n.me not in order[:2])
    first = sends(ask_granted(asker), swarm.Ask)[0]
    assert first.to == order[0]
    # a refused connection or a node of the old protocol: no need to wait for the ask timeout
    again = sends(asker.handle(swarm.Unreachable(order[0]), 0.01), swarm.Ask)
    assert [a.to for a in again] == [order[1]]
    assert asker.coordinator_for(D, 0.01) == order[1]


def test_an_abandoned_pull_hands_its_lease_back_and_is_forgotten():
    nodes = make(4)
    coordinator = coordinator_of(nodes)
    asker = next(n for n in nodes if n is not coordinator)
    lease = reply(coordinator, asker, sends(ask_granted(asker), swarm.Ask)[0].message)
    assert asker.handle(swarm.MessageReceived(coordinator.me, lease), 0.0) == [swarm.FetchUpstream(D, 0)]
    release = sends(asker.handle(swarm.Abandoned(D, swarm.Outcome.DIED), 0.1))
    assert [r.message for r in release] == [swarm.Release(D, asker.me, None, swarm.Outcome.DIED)]
    assert D not in asker.pulls
    coordinator.handle(swarm.MessageReceived(asker.me, release[0].message), 0.1)
    assert coordinator.lease_holder(D) is None
    # wanted again: a pull starts afresh
    assert asker.handle(swarm.Wanted(D), 0.2) == [swarm.CheckAccess(D)]
