"""Request bodies streamed upstream: the body pipe between the client's connection and the upstream
request."""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from dnsmirror.uploads import BodyPipe, ClientGone


class Client:
    def __init__(self):
        self.paused = False
        self.pauses = 0

    def pause(self):
        self.paused = True
        self.pauses += 1

    def resume(self):
        self.paused = False


class Consumer:
    def __init__(self):
        self.data = []

    def write(self, data):
        self.data.append(data)


def pipe(length=None):
    client = Client()
    return BodyPipe(length, client.pause, client.resume), client


def test_bytes_before_upstream_is_ready_are_held_and_the_client_paused_past_a_limit():
    body, client = pipe(3 * 1024 * 1024)
    assert body.length == 3 * 1024 * 1024
    chunk = b"x" * (512 * 1024)
    body.write(chunk)
    body.write(chunk)
    assert not client.paused
    body.write(chunk)
    assert client.paused
    consumer = Consumer()
    done = body.startProducing(consumer)
    assert b"".join(consumer.data) == chunk * 3 and not client.paused
    body.write(b"tail")
    assert consumer.data[-1] == b"tail"
    assert not done.called
    body.finish()
    assert done.called and done.result is None


def test_a_slow_upstream_pauses_the_client_and_nothing_is_lost():
    body, client = pipe()
    assert body.length is UNKNOWN_LENGTH
    consumer = Consumer()
    done = body.startProducing(consumer)
    body.write(b"a")
    body.pauseProducing()
    assert client.paused
    body.write(b"b")  # already in flight when the client was paused
    body.finish()
    assert consumer.data == [b"a"] and not done.called
    body.resumeProducing()
    assert consumer.data == [b"a", b"b"] and not client.paused and done.called


def test_a_client_leaving_mid_body_fails_the_upstream_request():
    body, _ = pipe(10)
    done = body.startProducing(Consumer())
    body.write(b"12345")
    body.fail(Failure(ClientGone("gone")))
    failures = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(ClientGone)


def test_upstream_giving_up_drains_the_rest_of_the_body():
    body, client = pipe(10)
    consumer = Consumer()
    body.startProducing(consumer)
    body.pauseProducing()
    body.write(b"held")
    body.stopProducing()
    assert not client.paused  # the client may finish sending; its bytes go nowhere
    body.write(b"more")
    body.finish()
    assert consumer.data == []


def test_finishing_a_request_whose_client_left_is_a_no_op():
    from twisted.web.test.requesthelper import DummyChannel

    from dnsmirror.uploads import StreamingRequest

    request = StreamingRequest(DummyChannel(), queued=False)
    request.connectionLost(Failure(ClientGone("gone")))
    request.finish()  # twisted.web's own Request raises RuntimeError here
    assert not request.finished
