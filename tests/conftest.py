"""Shared fixtures. The end-to-end harness lives in ``tests/harness`` (see its package docstring)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import require_netns
from harness.netns import Cluster
from harness.pki import TestCA, create_ca


@pytest.fixture
def netns_cluster() -> Iterator[Cluster]:
    """A fresh namespace cluster, deleted after the test; skips when namespaces are unavailable."""
    require_netns()
    with Cluster() as cluster:
        yield cluster


@pytest.fixture
def public_ca(tmp_path: Path) -> TestCA:
    """A test "public" CA (the web PKI stand-in that upstream registries' certificates chain to)."""
    return create_ca(tmp_path / "public-ca")


@pytest.fixture
def one_mib_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache writers move bytes to their files in 1 MiB blocks, for tests that count blocks in MiB (where a
    disk fails, what is in the file when): a fill does the same for any block size, and the store's own tests
    and the end-to-end ones use the real one."""
    from dnsmirror import store

    monkeypatch.setattr(store, "STAGE_SIZE", 1024 * 1024)
