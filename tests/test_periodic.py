"""Periodic loops survive anything a round raises, on a fake clock."""

from __future__ import annotations

from twisted.internet import defer, task

from dnsmirror.config import HostPort
from dnsmirror.health import HealthState, ListenerProbe
from dnsmirror.peers import FIRST_REANNOUNCE, Holders, PeerClient, PeerSet, PeerStats
from dnsmirror.periodic import Periodic


def test_a_round_that_raises_does_not_stop_the_loop(caplog):
    clock = task.Clock()
    calls = []

    def work():
        calls.append(clock.seconds())
        if len(calls) <= 2:
            raise OSError(24, "Too many open files")

    loop = Periodic(clock, 10, work, "test loop")
    loop.start()
    clock.pump([10] * 5)
    assert calls == [10, 20, 30, 40, 50] and loop.errors == 2
    assert "Too many open files" in caplog.text and "test loop failed" in caplog.text
    loop.stop()
    clock.advance(100)
    assert len(calls) == 5 and not clock.getDelayedCalls()


def test_a_failed_deferred_does_not_stop_the_loop_and_rounds_never_overlap():
    clock = task.Clock()
    rounds: list[defer.Deferred] = []

    def work():
        rounds.append(defer.Deferred())
        return rounds[-1]

    loop = Periodic(clock, 5, work, "test loop", first=0)
    loop.start()
    assert len(rounds) == 1  # first=0: at once
    clock.advance(5)
    assert len(rounds) == 1  # still running: skipped, not stacked
    rounds[0].errback(OSError(24, "Too many open files"))
    clock.advance(5)
    assert len(rounds) == 2 and loop.errors == 1
    rounds[1].callback(None)
    clock.advance(5)
    assert len(rounds) == 3
    loop.stop()


def test_a_round_may_ask_for_a_sooner_next_round():
    clock = task.Clock()
    calls = []
    loop = Periodic(
        clock, 100, lambda: calls.append(clock.seconds()) or (1 if len(calls) < 3 else None), "x", first=1
    )
    loop.start()
    clock.pump([1] * 10)
    assert calls == [1, 2, 3]
    clock.advance(92)  # t = 102: the interval since the third round (t = 3) has not passed
    assert len(calls) == 3
    clock.advance(1)
    assert len(calls) == 4
    loop.stop()


def test_the_cache_announcement_survives_running_out_of_descriptors():
    clock = task.Clock()
    failing = {"on": True}

    def is_local(host):
        if failing["on"]:
            raise OSError(24, "Too many open files")
        return False

    peers = PeerSet(clock, [HostPort("10.0.0.2", 5001)], None, 5001, is_local=is_local)
    client = PeerClient(
        clock, peers, Holders(), b"s" * 32, lookup=1, timeout=2, read_timeout=10, stats=PeerStats()
    )
    announced = []
    client.send_announcements = lambda per_peer: announced.append(per_peer) or 1

    def in_thread(function):
        return defer.maybeDeferred(function)

    original = peers.healthy

    def healthy(members):  # the first round dies inside membership, as is_local_address once did
        if failing["on"]:
            failing["on"] = False
            raise OSError(24, "Too many open files")
        return original(members)

    peers.healthy = healthy
    client.start_announcing(lambda: ["sha256:" + "a" * 64], in_thread)
    clock.advance(FIRST_REANNOUNCE)
    assert announced == []
    clock.pump([FIRST_REANNOUNCE] * 3 + [3 * 3600.0])
    assert announced, "the announcement loop died after one error"
    client.stop_announcing()


def test_is_self_does_not_remember_an_answer_it_could_not_check():
    clock = task.Clock()
    answers = [OSError(24, "Too many open files"), True]

    def is_local(host):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    me = HostPort("10.0.0.1", 5001)
    peers = PeerSet(clock, [me], None, 5001, is_local=is_local)
    assert peers.members() == [me]  # could not check: not taken for this node
    assert peers.members() == []  # checked: it is this node, remembered
    assert peers.members() == []


def test_the_health_probe_survives_a_round_that_raises():
    clock, state = task.Clock(), HealthState()
    probe = ListenerProbe(clock, state, [HostPort("127.0.0.1", 8443)], interval=2.0, timeout=1.0, failures=1)
    probe._connect = lambda target: defer.succeed(None)
    heard = []

    def listener(healthy):  # whatever hears of a change fails once, as a call out of descriptors would
        heard.append(healthy)
        if len(heard) == 2:
            raise OSError(24, "Too many open files")

    state.subscribe(listener)
    probe.start()
    assert state.healthy
    probe._connect = lambda target: defer.fail(ConnectionRefusedError())
    clock.advance(2)  # this round's listener raises
    clock.advance(2)
    probe._connect = lambda target: defer.succeed(None)
    clock.advance(2)
    assert heard == [False, True, False, True], "the probe stopped after one round raised"
    probe.stop()
