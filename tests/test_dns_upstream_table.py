"""The forwarder's memory of upstream health and latency (pure logic)."""

from __future__ import annotations

import random

from dnsmirror.dns.upstreams import PROBE_BACKOFF_MAX, PROBE_BACKOFF_START, UpstreamTable


def table(count: int) -> UpstreamTable:
    return UpstreamTable(count, rng=random.Random(7))


def test_config_order_until_measured_then_fastest_first():
    upstreams = table(3)
    assert upstreams.order() == [0, 1, 2]
    upstreams.answered(2, 0.001)
    upstreams.answered(0, 0.020)
    orders = [upstreams.order() for _ in range(200)]
    assert orders.count([2, 0, 1]) > 180  # a few explore a slower one first
    assert all(sorted(order) == [0, 1, 2] for order in orders)


def test_a_failed_upstream_goes_last_until_a_probe_finds_it():
    upstreams = table(2)
    assert upstreams.failed(0, now=100.0, reason="no answer") is True
    assert upstreams.order()[0] == 1 and upstreams.order()[-1] == 0
    assert upstreams.due_probes(100.0) == []
    assert upstreams.due_probes(100.0 + PROBE_BACKOFF_START) == [0]
    assert upstreams.due_probes(200.0) == []  # no second probe while one is out
    assert upstreams.answered(0, 0.002) is True
    assert upstreams.down() == []


def test_probes_back_off_while_an_upstream_stays_down():
    upstreams = table(1)
    upstreams.failed(0, now=0.0, reason="refused")
    now, gaps = 0.0, []
    for _ in range(8):
        due = upstreams.states[0].next_probe
        gaps.append(due - now)
        now = due
        assert upstreams.due_probes(now) == [0]
        upstreams.failed(0, now=now, reason="refused", probe=True)
    assert gaps[0] == PROBE_BACKOFF_START
    assert gaps == sorted(gaps) and max(gaps) == PROBE_BACKOFF_MAX


def test_every_upstream_is_tried_when_all_are_down():
    upstreams = table(3)
    for index in range(3):
        upstreams.failed(index, now=0.0, reason="no answer")
    assert upstreams.order() == [0, 1, 2]


def test_queries_failing_on_a_down_upstream_do_not_push_its_probe_back():
    upstreams = table(2)
    upstreams.failed(0, now=10.0, reason="refused")
    for _ in range(100):  # the queries that were under way when it died
        upstreams.failed(0, now=10.0, reason="refused")
    assert upstreams.due_probes(10.0 + PROBE_BACKOFF_START) == [0]


def test_an_upstream_another_process_saw_answer_is_up_with_its_latency_kept():
    upstreams = table(2)
    upstreams.answered(0, 0.004)
    upstreams.failed(0, now=100.0, reason="no answer")
    assert upstreams.recovered(0) is True
    assert upstreams.down() == [] and upstreams.states[0].srtt == 0.004
    assert upstreams.states[0].failures == 0 and upstreams.states[0].backoff == PROBE_BACKOFF_START
    assert upstreams.recovered(1) is False  # it was up
