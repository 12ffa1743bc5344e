"""A fill's flow control, decided without I/O: upstream paused exactly while a reason holds, bytes written
in order in batches."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnsmirror.flow import Upstream, Write, WriteBatches, readable, upstream_action

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


# --- the write queue: batches, one write in flight, the rest in the last write, disk-behind hysteresis


def test_writes_wait_for_a_batch_and_the_last_carries_the_rest():
    batches = WriteBatches(batch=4, high_water=10, low_water=3)
    batches.received(b"ab")
    assert batches.next_write() is None  # 2 < 4: readers are served from memory meanwhile
    batches.received(b"cd")
    write = batches.next_write()
    assert write == Write([b"ab", b"cd"], 4, last=False)
    batches.received(b"efghij")
    assert batches.next_write() is None  # one write in flight at a time
    batches.wrote(4)
    assert batches.next_write() == Write([b"efghij"], 6, last=False)
    batches.received(b"k")
    batches.finish()
    assert batches.next_write() is None  # the last write waits for the one in flight
    batches.wrote(6)
    assert batches.next_write() == Write([b"k"], 1, last=True)
    assert batches.next_write() is None  # nothing after the last


def test_a_body_ending_on_a_written_batch_still_gets_a_last_write_to_verify():
    batches = WriteBatches(batch=2, high_water=10, low_water=3)
    batches.received(b"ab")
    batches.next_write()
    batches.wrote(2)
    batches.finish()
    assert batches.next_write() == Write([], 0, last=True)


def test_the_disk_is_behind_from_the_high_mark_until_the_low_one():
    batches = WriteBatches(batch=1, high_water=10, low_water=3)
    assert batches.received(b"x" * 9) is False  # 9 unwritten: below the high mark
    assert batches.next_write() == Write([b"x" * 9], 9, last=False)
    assert batches.received(b"y" * 4) is True  # 13 (9 in flight, 4 queued)
    assert batches.wrote(9) is True  # 4: above the low mark, still behind
    assert batches.next_write() == Write([b"y" * 4], 4, last=False)
    assert batches.received(b"z" * 3) is True  # 7: between the marks, still behind
    assert batches.wrote(4) is False  # 3: at the low mark, caught up
    assert batches.next_write() == Write([b"z" * 3], 3, last=False)
    assert batches.received(b"w" * 6) is False  # 9: between the marks, still caught up
    assert batches.received(b"v") is True  # 10: at the high mark
def test_a_failed_fill_drops_its_queue_and_starts_no_write():
    batches = WriteBatches(batch=4, high_water=10, low_water=3)
    batches.received(b"abcd")
    batches.next_write()
    batches.received(b"efgh")
    batches.fail()
    batches.wrote(4)  # the write in flight still reports back
    batches.received(b"ijkl")
    batches.finish()
    assert batches.next_write() is None


def test_marks_and_batches_must_make_sense():
    for batch, high, low in ((0, 10, 3), (4, 3, 3), (4, 10, -1)):
        with pytest.raises(ValueError):
            WriteBatches(batch, high, low)


marks = st.integers(min_value=1, max_value=60).flatmap(
    lambda high: st.tuples(st.integers(min_value=1, max_value=40), st.just(high),
                           st.integers(min_value=0, max_value=high - 1)))
events = st.lists(st.one_of(st.integers(min_value=0, max_value=25),  # bytes received
                            st.sampled_from(["wrote", "finish", "fail"])), max_size=80)


@given(marks, events)
def test_bytes_reach_the_disk_in_order_once_each_with_one_write_in_flight(marks, events):
    batch, high, low = marks
    batches = WriteBatches(batch, high, low)
    body = b""  # received so far; each byte differs from its neighbours, so order shows
    done = b""  # in writes that completed
    sent = b""  # in writes started
    in_flight: Write | None = None
    last: Write | None = None
    finished = failed = False

    def start() -> None:
        # what the fill does after every event
        nonlocal in_flight, last, sent
        write = batches.next_write()
        if write is None:
            queued = len(body) - len(sent)
            # a full batch, or the end of the body, never waits behind an idle disk
            assert in_flight is not None or last is not None or failed or (not finished and queued < batch)
            return
        assert in_flight is None and last is None and not failed, "a second write in flight"
        assert write.size == sum(len(chunk) for chunk in write.chunks)
        sent += b"".join(write.chunks)
        assert body.startswith(sent), "bytes written out of order or twice"
        if write.last:
            assert finished and sent == body, "the last write carries the rest"
            last = write
        else:
            assert not finished and write.size >= batch
            in_flight = write

    def disk_done() -> bool:
        nonlocal in_flight, done
        assert in_flight is not None
        write, in_flight = in_flight, None
        done += b"".join(write.chunks)
        return batches.wrote(write.size)

    for event in events:
        behind = batches.disk_behind
        if isinstance(event, int):
            if finished or last is not None:
                continue
            chunk = bytes((len(body) + i) % 251 for i in range(event))
            if not failed:  # the fill takes nothing after a failure; the queue ignores it too
                body += chunk
            now = batches.received(chunk)
            # behind from the high mark on, and only from there
            assert now == (behind or len(body) - len(done) >= high)
        elif event == "wrote":
            if in_flight is None:
                continue
            now = disk_done()
            # caught up at the low mark, and only there
            assert now == (behind and len(body) - len(done) > low)
        elif event == "finish":
            if finished:
                continue
            finished = True
            batches.finish()
            now = batches.disk_behind
            assert now == behind
        else:
            failed = True
            batches.fail()
            now = batches.disk_behind
            assert now == behind
        assert batches.disk_behind == now
        start()
    if finished and not failed:
        while in_flight is not None:  # the disk catches up
            disk_done()
            start()
        assert last is not None and sent == body
