"""The pull report: pure bookkeeping with plain asserts, the reporter on task.Clock."""

from __future__ import annotations

import json

from twisted.internet import task

from dnsmirror.pulls import PullReporter, PullTracker, image_blobs, reaches_the_end, source_mix

CONFIG, LAYER1, LAYER2 = "sha256:" + "c" * 64, "sha256:" + "1" * 64, "sha256:" + "2" * 64
MANIFEST = "sha256:" + "m" * 64
HOST, REPO, CLIENT = "ghcr.io", "team/app", "10.0.0.7"


def manifest(*layers: str) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": CONFIG, "size": 100, "mediaType": "application/vnd.oci.image.config.v1+json"},
        "layers": [{"digest": layer, "size": 1000} for layer in layers],
    }).encode()


def test_image_blobs_reads_config_and_layers_but_not_an_index():
    assert image_blobs(manifest(LAYER1, LAYER2)) == {CONFIG: 100, LAYER1: 1000, LAYER2: 1000}
    index = json.dumps(
        {"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{"digest": MANIFEST}]}
    )
    assert image_blobs(index.encode()) is None
    assert image_blobs(b"\xff not json") is None
    many = json.dumps(
        {"config": {"digest": CONFIG}, "layers": [{"digest": f"sha256:{i:064x}"} for i in range(5000)]}
    )
    assert len(image_blobs(many.encode())) == 1000  # bounded


def test_helpers():
    assert reaches_the_end(200, None)
    assert reaches_the_end(206, "bytes 500-999/1000")
    assert not reaches_the_end(206, "bytes 0-499/1000")
    assert not reaches_the_end(404, None)
    from collections import Counter
    assert source_mix(Counter(upstream=5, cache=1)) == "cache+upstream"
    assert source_mix(Counter()) == "none"


def test_a_complete_pull_is_reported_once_with_bytes_by_source_and_times():
    tracker = PullTracker()
    assert (
        tracker.manifest_sent(CLIENT, HOST, REPO, MANIFEST, manifest(LAYER1, LAYER2), started=10.0, now=10.1)
        == []
    )
    for digest in (CONFIG, LAYER1, LAYER2):
        tracker.blob_started(CLIENT, HOST, REPO, digest, now=10.2)
    assert tracker.blob_ended(CLIENT, HOST, REPO, CONFIG, source="cache", sent=100, complete=True,
                              first_byte_at=10.3, now=10.3) == []
    # another client's and another repository's requests do not count for this pull
    tracker.blob_ended("10.0.0.8", HOST, REPO, LAYER1, source="upstream", sent=1000, complete=True,
                       first_byte_at=10.3, now=10.4)
    tracker.blob_ended(CLIENT, HOST, "other/repo", LAYER1, source="upstream", sent=1000, complete=True,
                       first_byte_at=10.3, now=10.4)
    assert tracker.blob_ended(CLIENT, HOST, REPO, LAYER1, source="peer", sent=1000, complete=True,
                              first_byte_at=10.5, now=11.0) == []
    [report] = tracker.blob_ended(CLIENT, HOST, REPO, LAYER2, source="upstream", sent=1000, complete=True,
                                  first_byte_at=10.6, now=12.0)
    assert report == {
        "event": "pull", "outcome": "complete", "image": f"{HOST}/{REPO}@{MANIFEST}", "client": CLIENT,
        "blobs": 3, "blobs_sent": 3, "image_bytes": 2100, "bytes_cache": 100, "bytes_peer": 1000,
        "bytes_upstream": 1000, "bytes_containerd": 0, "source_mix": "cache+peer+upstream",
        "first_byte_s": 0.3, "seconds": 2.0,
    }
    assert tracker.open == {}
    assert tracker.tick(1000.0) == []


def test_a_blob_cut_and_resumed_with_a_range_counts_both_parts():
    tracker = PullTracker()
    tracker.manifest_sent(CLIENT, HOST, REPO, MANIFEST, manifest(LAYER1), started=0.0, now=0.0)
    tracker.blob_ended(
        CLIENT, HOST, REPO, CONFIG, source="cache", sent=100, complete=True, first_byte_at=0.1, now=0.1
    )
    assert tracker.blob_ended(CLIENT, HOST, REPO, LAYER1, source="upstream", sent=400, complete=False,
                              first_byte_at=0.2, now=1.0) == []
    [report] = tracker.blob_ended(CLIENT, HOST, REPO, LAYER1, source="cache", sent=600, complete=True,
                                  first_byte_at=1.1, now=2.0)
    assert (report["bytes_upstream"], report["bytes_cache"], report["outcome"]) == (400, 700, "complete")


def test_blobs_the_client_already_had_end_the_pull_as_partial_when_it_goes_quiet():
    tracker = PullTracker(settle=30.0)
    tracker.manifest_sent(CLIENT, HOST, REPO, MANIFEST, manifest(LAYER1, LAYER2), started=0.0, now=0.0)
    tracker.blob_ended(CLIENT, HOST, REPO, LAYER2, source="containerd", sent=1000, complete=True,
                       first_byte_at=0.5, now=1.0)
    assert tracker.tick(30.0) == []
    [report] = tracker.tick(31.0)
    assert (report["outcome"], report["blobs_sent"], report["bytes_containerd"]) == ("partial", 1, 1000)


def test_a_pull_that_never_finishes_is_reported_when_it_times_out():
    tracker = PullTracker(settle=30.0, timeout=600.0)
    tracker.manifest_sent(CLIENT, HOST, REPO, MANIFEST, manifest(LAYER1), started=0.0, now=0.0)
    tracker.blob_started(CLIENT, HOST, REPO, LAYER1, now=1.0)  # in flight, never ends
    assert tracker.tick(300.0) == []  # a long download is not quiet
    [report] = tracker.tick(601.0)
    assert (report["outcome"], report["blobs_sent"], report["first_byte_s"]) == ("timed_out", 0, None)


def test_open_pulls_are_bounded():
    tracker = PullTracker(max_pulls=10)
    reports = []
    for index in range(25):
        reports += tracker.manifest_sent(f"10.0.0.{index}", HOST, REPO, MANIFEST, manifest(LAYER1),
                                         started=index, now=index)
    assert len(tracker.open) == 10
    assert [r["client"] for r in reports] == [f"10.0.0.{i}" for i in range(15)]
    assert {r["outcome"] for r in reports} == {"evicted"}


def test_the_reporter_logs_timeouts_on_its_clock_and_keeps_a_bounded_histogram():
    clock = task.Clock()
    lines = []
    reporter = PullReporter(clock, PullTracker(settle=30.0, timeout=60.0), interval=5.0, emit=lines.append)
    reporter.start()
    reporter.tracker.manifest_sent(CLIENT, HOST, REPO, MANIFEST, manifest(LAYER1), started=0.0, now=0.0)
    reporter.tracker.blob_started(CLIENT, HOST, REPO, LAYER1, now=0.0)
    clock.advance(55)
    assert lines == []
    clock.advance(10)
    assert [line["outcome"] for line in lines] == ["timed_out"]
    families = {family.name: family for family in reporter.families()}
    buckets = {(s.labels.get("source_mix"), s.labels.get("le")): s.value
               for s in families["dnsmirror_image_pull_seconds"].samples if s.name.endswith("_bucket")}
    assert (
        buckets[("none", "30.0")] == 0 and buckets[("none", "60.0")] == 0 and buckets[("none", "120.0")] == 1
    )
    outcomes = {s.labels["outcome"]: s.value for s in families["dnsmirror_image_pulls"].samples}
    assert outcomes["timed_out"] == 1 and outcomes["complete"] == 0
    reporter.stop()
    assert clock.getDelayedCalls() == []


def test_a_pull_through_an_index_counts_from_the_index_request():
    tracker = PullTracker(settle=30.0)
    index = json.dumps({"mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"digest": MANIFEST}, {"digest": "sha256:" + "9" * 64}]}).encode()
    tracker.index_sent(CLIENT, HOST, REPO, index, started=5.0)
    tracker.manifest_sent(CLIENT, HOST, REPO, MANIFEST, manifest(), started=5.5, now=5.6)
    [report] = tracker.blob_ended(CLIENT, HOST, REPO, CONFIG, source="cache", sent=100, complete=True,
                                  first_byte_at=5.8, now=6.0)
    assert (report["seconds"], report["first_byte_s"]) == (1.0, 0.8)
    # an index long before does not stretch a later pull; the index table stays bounded
    tracker.index_sent(CLIENT, HOST, REPO, index, started=100.0)
    tracker.manifest_sent(CLIENT, HOST, REPO, MANIFEST, manifest(), started=200.0, now=200.0)
    assert tracker.open[(CLIENT, HOST, REPO, MANIFEST)].started == 200.0
    small = PullTracker(max_pulls=3)
    for n in range(10):
        small.index_sent(f"10.0.0.{n}", HOST, REPO, index, started=n)
    assert len(small.indexes) <= 3


def test_a_failing_report_does_not_stop_the_reporter():
    clock = task.Clock()
    lines = []

    def emit(values):
        if not lines:
            lines.append(None)
            raise RuntimeError("a log handler failed")
        lines.append(values["outcome"])

    reporter = PullReporter(clock, PullTracker(settle=10.0), interval=5.0, emit=emit)
    reporter.start()
    for client in ("10.0.0.1", "10.0.0.2"):
        reporter.tracker.manifest_sent(client, HOST, REPO, MANIFEST, manifest(LAYER1), started=0.0, now=0.0)
        clock.advance(15)  # the first pull's report raises; the timer carries on to the second's
    assert lines == [None, "partial"]
    reporter.stop()
    assert clock.getDelayedCalls() == []
