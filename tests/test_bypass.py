"""A registry whose certificate the mirror cannot verify stops being captured for a while (fail open)."""

from __future__ import annotations

import logging

from test_dns_packets import query
from twisted.internet import task

from dnsmirror.bypass import TlsBypass
from dnsmirror.dns.packets import Action, Responder
from dnsmirror.patterns import HostMatcher

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
OTHER = "210987654321.dkr.ecr.eu-west-1.amazonaws.com"


def bypass_and_responder(duration: float = 300.0) -> tuple[task.Clock, TlsBypass, Responder]:
    clock = task.Clock()
    responder = Responder(HostMatcher(["*.dkr.ecr.*.amazonaws.com", "docker.io", "registry-1.docker.io"]),
                          "10.96.0.53", None, ttl=5)
    bypass = TlsBypass(clock, duration, responder.forget_answers)
    responder.bypassed = bypass.bypassed
    responder.capture_enabled = True
    return clock, bypass, responder


def test_a_tls_failure_forwards_that_registry_only_until_the_bypass_ends(caplog):
    clock, bypass, responder = bypass_and_responder()
    packet = query(ECR)
    assert responder.decide(packet).action is Action.ANSWER
    assert responder.cached_answer(packet) is not None

    with caplog.at_level(logging.WARNING, logger="dnsmirror.bypass"):
        bypass.record_failure(ECR, "certificate verify failed")
    assert "upstream.ca_bundle" in caplog.text and ECR in caplog.text
    # the remembered captured answer is gone, and the name is forwarded to the real resolvers
    assert responder.cached_answer(packet) is None
    decision = responder.decide(packet)
    assert decision.action is Action.FORWARD and decision.fail_open and decision.captured
    assert responder.decide(query(ECR.upper() + ".", "AAAA")).action is Action.FORWARD
    # other registries stay captured
    assert responder.decide(query(OTHER)).action is Action.ANSWER
    assert (bypass.started, bypass.active) == (1, 1)

    clock.advance(299)
    assert responder.decide(packet).action is Action.FORWARD
    clock.advance(1)
    assert responder.decide(packet).action is Action.ANSWER
    assert (bypass.started, bypass.active) == (1, 0)


def test_failures_during_a_bypass_do_not_extend_it():
    clock, bypass, responder = bypass_and_responder(60)
    bypass.record_failure(ECR, "first")
    clock.advance(30)
    bypass.record_failure(ECR.upper() + ".", "an in-flight request failing the same way")
    assert bypass.started == 1
    clock.advance(30)
    assert not bypass.bypassed(ECR)
    bypass.record_failure(ECR, "still failing after the bypass")  # a new failure: a new bypass
    assert bypass.started == 2 and bypass.bypassed(ECR)


def test_docker_hub_names_follow_the_host_the_mirror_contacted():
    _clock, bypass, responder = bypass_and_responder()
    bypass.record_failure("registry-1.docker.io", "certificate verify failed")
    assert responder.decide(query("docker.io")).action is Action.FORWARD
    assert responder.decide(query("registry-1.docker.io")).action is Action.FORWARD


def test_zero_duration_never_bypasses():
    clock, bypass, responder = bypass_and_responder(0)
    bypass.record_failure(ECR, "certificate verify failed")
    assert responder.decide(query(ECR)).action is Action.ANSWER
    assert bypass.started == 0 and clock.getDelayedCalls() == []
