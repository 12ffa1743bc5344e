"""A fill's flow control, decided without I/O: upstream paused exactly while a reason holds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dnsmirror.flow import Upstream, readable, upstream_action

REASONS = ("disk", "readers", "memory")


def test_any_reason_pauses_and_only_the_last_one_gone_resumes():
    assert upstream_action(True, False, False, paused=False) is Upstream.PAUSE
    assert upstream_action(True, True, False, paused=True) is None  # a second reason: already paused
    assert upstream_action(False, True, False, paused=True) is None  # one reason left
    assert upstream_action(False, False, False, paused=True) is Upstream.RESUME
    assert upstream_action(False, False, False, paused=False) is None


@given(st.lists(st.tuples(st.sampled_from(REASONS), st.booleans()), max_size=60))
def test_upstream_follows_the_reasons_and_is_never_told_the_same_thing_twice(changes):
    reasons = dict.fromkeys(REASONS, False)
    paused, told = False, []
    for reason, on in changes:
        reasons[reason] = on
        action = upstream_action(reasons["disk"], reasons["readers"], reasons["memory"], paused)
        if action is not None:
            told.append(action)
            paused = action is Upstream.PAUSE
        assert paused == any(reasons.values())
    assert all(first is not second for first, second in zip(told, told[1:], strict=False))


@given(st.integers(min_value=0, max_value=2**40))
def test_the_last_byte_waits_for_the_digest(received):
    assert readable(received, verified=True) == received
    assert readable(received, verified=False) == max(0, received - 1)
    assert readable(received, verified=False) < received or received == 0
