"""The pull report: one line per image pull, saying where its bytes came from and how long it took.

dnsmirror serves the image manifest a client pulls, so it knows the blobs (config and layers) that make
up the image. A pull is keyed by (client address, registry host, repository, manifest digest); it starts
when that client is sent an image manifest (an index starts none: the platform manifest that follows
does, and its time counts from the index request when that came within ``settle`` seconds before) and
collects the client's blob responses for those digests in that repository. It ends:

- ``complete``: every blob of the image was sent to the client in full;
- ``partial``: no blob request of the pull in flight for :attr:`PullTracker.settle` seconds while some
  blobs were never asked for (the client had them already, e.g. in containerd's content store);
- ``timed_out``: a blob request in flight, and none began or ended, for :attr:`PullTracker.timeout` seconds
  (a single blob streaming for longer ends its pull's report so);
- ``evicted``: more than :attr:`PullTracker.max_pulls` pulls open at once, the oldest is reported early.

:class:`PullTracker` is pure (events in, report dicts out, time passed in); :class:`PullReporter` feeds it
from the request path, logs each report and keeps the ``dnsmirror_image_pull_seconds`` histogram by
source mix. Memory is bounded by ``max_pulls`` x ``MAX_BLOBS``; metric labels take at most 16 values.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dnsmirror.logs import fields

if TYPE_CHECKING:  # the module itself runs without Twisted and Prometheus imported
    from prometheus_client.metrics_core import Metric
    from twisted.internet.interfaces import IReactorTime

    from dnsmirror.periodic import Periodic
    from dnsmirror.target import Target

log = logging.getLogger("dnsmirror.pulls")

# where a blob response's bytes came from, as the report counts them (access-log source -> category)
CATEGORIES = ("cache", "peer", "upstream", "containerd")
_CATEGORY = {"cache": "cache", "fill": "cache", "peer": "peer", "upstream": "upstream", "relay": "upstream",
             "containerd": "containerd"}
IMAGE_MANIFEST_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
})
INDEX_TYPES = frozenset({
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})
MAX_BLOBS = 1000
# the manifest body kept from a response for the report (larger manifests start no pull)
MAX_MANIFEST_BYTES = 256 * 1024
PULL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def image_blobs(body: bytes) -> dict[str, int] | None:
    """``{digest: size}`` of an image manifest's config and layers; None for an index or anything else."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or isinstance(document.get("manifests"), list):
        return None
    media_type = document.get("mediaType")
    layers = document.get("layers")
    if (media_type is not None and media_type not in IMAGE_MANIFEST_TYPES) or not isinstance(layers, list):
        return None
    blobs: dict[str, int] = {}
    for descriptor in [document.get("config"), *layers][:MAX_BLOBS]:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            size = descriptor.get("size")
            blobs[descriptor["digest"]] = size if isinstance(size, int) and size >= 0 else 0
    return blobs or None


def index_manifests(body: bytes) -> list[str]:
    """The manifest digests an image index lists (at most :data:`MAX_BLOBS`), or [] for anything else."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    manifests = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(manifests, list):
        return []
    return [
        d["digest"] for d in manifests[:MAX_BLOBS] if isinstance(d, dict) and isinstance(d.get("digest"), str)
    ]


def source_mix(bytes_by_category: Counter[str]) -> str:
    """``cache``, ``peer+upstream``, ...: the categories that sent bytes, or ``none``."""
    return "+".join(c for c in CATEGORIES if bytes_by_category[c] > 0) or "none"


def reaches_the_end(status: int, content_range: str | None) -> bool:
    """Whether a 200, or a 206 whose ``bytes a-b/total`` ends at the last byte, sent the blob's end."""
    if status == 200:
        return True
    if status != 206 or not content_range:
        return False
    try:
        span, total = content_range.removeprefix("bytes ").split("/")
        return int(span.split("-")[1]) == int(total) - 1
    except (ValueError, IndexError):
        return False


@dataclass
class Pull:
    """One image pull in progress."""

    client: str
    host: str
    repository: str
    manifest: str
    started: float
    blobs: dict[str, int]
    pending: set[str]
    last_activity: float
    in_flight: int = 0
    first_byte: float | None = None
    bytes: Counter[str] = field(default_factory=Counter)
    requests: int = 0

    def report(self, outcome: str, now: float) -> dict[str, Any]:
        """The report line's fields."""
        done = len(self.blobs) - len(self.pending)
        values: dict[str, Any] = {
            "event": "pull", "outcome": outcome, "image": f"{self.host}/{self.repository}@{self.manifest}",
            "client": self.client, "blobs": len(self.blobs), "blobs_sent": done,
            "image_bytes": sum(self.blobs.values()),
        }
        for category in CATEGORIES:
            values[f"bytes_{category}"] = self.bytes[category]
        values["source_mix"] = source_mix(self.bytes)
        values["first_byte_s"] = (
            round(self.first_byte - self.started, 3) if self.first_byte is not None else None
        )
        values["seconds"] = round(now - self.started, 3)
        return values


class PullTracker:
    """Pure bookkeeping of image pulls: each event method returns the report lines it ended."""

    def __init__(self, settle: float = 30.0, timeout: float = 600.0, max_pulls: int = 1000) -> None:
        self.settle = settle
        self.timeout = timeout
        self.max_pulls = max_pulls
        self.open: dict[tuple[str, str, str, str], Pull] = {}
        # (client, host, repository, platform manifest) -> when the index naming it was asked for
        self.indexes: dict[tuple[str, str, str, str], float] = {}

    def index_sent(self, client: str, host: str, repository: str, body: bytes, started: float) -> None:
        """An image index was sent: a pull of one of its manifests that follows started with it."""
        for digest in index_manifests(body):
            if len(self.indexes) >= self.max_pulls:
                del self.indexes[next(iter(self.indexes))]  # the oldest
            self.indexes[(client, host, repository, digest)] = started

    def manifest_sent(self, client: str, host: str, repository: str, digest: str, body: bytes,
                      started: float, now: float) -> list[dict[str, Any]]:
        """An image manifest was sent in full to ``client``: a pull starts (an index starts none)."""
        blobs = image_blobs(body)
        key = (client, host, repository, digest)
        index_started = self.indexes.pop(key, None)
        if index_started is not None and started - index_started <= self.settle:
            started = index_started
        if blobs is None or key in self.open:
            return []
        reports = []
        if len(self.open) >= self.max_pulls:
            oldest = min(self.open, key=lambda k: self.open[k].last_activity)
            reports.append(self.open.pop(oldest).report("evicted", now))
        self.open[key] = Pull(client, host, repository, digest, started, blobs, set(blobs), now)
        return reports

    def blob_started(self, client: str, host: str, repository: str, digest: str, now: float) -> None:
        """A blob GET of ``client`` began: the pulls that need it are not idle while it runs."""
        for pull in self._pulls_of(client, host, repository, digest):
            pull.in_flight += 1
            pull.last_activity = now

    def blob_ended(self, client: str, host: str, repository: str, digest: str, *, source: str, sent: int,
                   complete: bool, first_byte_at: float | None, now: float) -> list[dict[str, Any]]:
        """A blob response ended (``complete``: the blob's last byte was sent)."""
        reports = []
        for pull in self._pulls_of(client, host, repository, digest):
            pull.in_flight = max(0, pull.in_flight - 1)
            pull.last_activity = now
            pull.requests += 1
            category = _CATEGORY.get(source)
            if category is not None:
                pull.bytes[category] += sent
            if first_byte_at is not None and (pull.first_byte is None or first_byte_at < pull.first_byte):
                pull.first_byte = first_byte_at
            if complete:
                pull.pending.discard(digest)
            if not pull.pending and pull.in_flight == 0:
                del self.open[(pull.client, pull.host, pull.repository, pull.manifest)]
                reports.append(pull.report("complete", now))
        return reports

    def tick(self, now: float) -> list[dict[str, Any]]:
        """End the pulls that went quiet (``partial``) or stalled (``timed_out``)."""
        reports = []
        for key, pull in list(self.open.items()):
            idle = now - pull.last_activity
            if pull.in_flight == 0 and idle >= self.settle:
                reports.append(pull.report("complete" if not pull.pending else "partial", now))
            elif pull.in_flight > 0 and idle >= self.timeout:
                reports.append(pull.report("timed_out", now))
            else:
                continue
            del self.open[key]
        return reports

    def _pulls_of(self, client: str, host: str, repository: str, digest: str) -> list[Pull]:
        return [pull for (c, h, r, _), pull in self.open.items()
                if c == client and h == host and r == repository and digest in pull.blobs]


class PullReporter:
    """Feeds a :class:`PullTracker` from the request path, logs its reports and keeps the metrics."""

    def __init__(self, clock: IReactorTime, tracker: PullTracker | None = None, interval: float = 5.0,
                 emit: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.clock = clock
        self.tracker = tracker or PullTracker()
        self.interval = interval
        self.emit = emit or (lambda values: log.info("image pull", extra=fields(**values)))
        from dnsmirror.metrics import Histogram  # a reporter runs with Prometheus imported

        self.seconds = Histogram(PULL_BUCKETS)  # by source mix
        self.outcomes: Counter[str] = Counter()
        self._loop: Periodic | None = None

    def start(self) -> None:
        from dnsmirror.periodic import Periodic  # Twisted is imported only by a reporter that runs

        self._loop = Periodic(self.clock, self.interval, self._tick, "pull report")
        self._loop.start()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> None:
        self._publish(self.tracker.tick(self.clock.seconds()))

    def request_started(self, request: Any, target: Target) -> None:
        """Called as a request to the registry front begins (``target``: its
        :class:`~dnsmirror.target.Target`)."""
        if target.method != "GET":
            return
        if target.is_manifest:
            request.kept_body = bytearray()  # the request keeps up to MAX_MANIFEST_BYTES of what it sends
            return
        if target.path is None or not target.path.by_digest:
            return
        self.tracker.blob_started(_client(request), target.upstream_host, target.repository, target.digest,
                                  self.clock.seconds())

    def request_ended(self, request: Any, values: dict[str, Any]) -> None:
        """Called with each finished response and its access-log fields."""
        target = getattr(request, "target", None)
        if target is None or target.method != "GET":
            return
        now = self.clock.seconds()
        client = values.get("client") or ""
        done = values.get("outcome") is None
        if target.is_manifest:
            body = getattr(request, "kept_body", None)
            content_type = (request.responseHeaders.getRawHeaders(b"content-type") or [b""])[0].decode(
                "latin-1"
            )
            digest = target.digest or (request.responseHeaders.getRawHeaders(b"docker-content-digest")
                                       or [b""])[0].decode("latin-1")
            media_type = content_type.split(";")[0]
            if done and request.code == 200 and body and media_type in INDEX_TYPES:
                self.tracker.index_sent(client, target.upstream_host, target.repository, bytes(body),
                                        self._since(request, now))
            elif done and request.code == 200 and body and digest and media_type in IMAGE_MANIFEST_TYPES:
                self._publish(
                    self.tracker.manifest_sent(
                        client,
                        target.upstream_host,
                        target.repository,
                        digest,
                        bytes(body),
                        self._since(request, now),
                        now,
                    )
                )
            return
        if target.path is None or not target.path.by_digest:
            return
        content_range = request.responseHeaders.getRawHeaders(b"content-range")
        complete = done and reaches_the_end(
            request.code, content_range[0].decode("latin-1") if content_range else None
        )
        first_write = getattr(request, "first_byte_at", None)
        self._publish(
            self.tracker.blob_ended(
                client,
                target.upstream_host,
                target.repository,
                target.digest,
                source=values.get("source") or "",
                sent=values.get("bytes") or 0,
                complete=complete,
                first_byte_at=self._since(request, now, first_write) if first_write is not None else None,
                now=now,
            )
        )

    def _since(self, request: Any, now: float, moment: float | None = None) -> float:
        """A monotonic instant of the request (its start by default) on this reporter's clock."""
        moment = getattr(request, "started_at", None) if moment is None else moment
        return now if moment is None else now - (time.monotonic() - moment)

    def _publish(self, reports: Iterable[dict[str, Any]]) -> None:
        for values in reports:
            self.outcomes[values["outcome"]] += 1
            self.seconds.observe(values["source_mix"], values["seconds"])
            self.emit(values)

    def families(self) -> Iterable[Metric]:
        """``dnsmirror_image_pull_seconds{source_mix}`` and ``dnsmirror_image_pulls_total{outcome}``."""
        from prometheus_client.core import CounterMetricFamily

        yield self.seconds.family(
            "dnsmirror_image_pull_seconds",
            "Image pulls by the sources that sent their bytes: time from the index (or image manifest) "
            "request to the pull's end",
            "source_mix",
        )
        pulls = CounterMetricFamily("dnsmirror_image_pulls", "Image pulls reported, by how they ended",
                                    labels=["outcome"])
        for outcome in ("complete", "partial", "timed_out", "evicted"):
            pulls.add_metric([outcome], self.outcomes[outcome])
        yield pulls


def _client(request: Any) -> str:
    return getattr(request.getClientAddress(), "host", None) or ""
