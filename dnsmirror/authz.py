"""Who may read cached content: the multi-team promise.

A cached blob or manifest is served to a request only when upstream would serve it to that request's
credentials (or to anonymity). Asking upstream on every hit would make the cache pointless, so
successful upstream answers leave *grants*: a credential that fetched a manifest of repository R is
granted the digests the manifest references, in R, for ``fresh_ttl``; a credential upstream answered
200 for a digest is granted that digest. Without a fresh grant the caller asks upstream (a HEAD with
the request's own credentials) and records the answer.

When upstream is unreachable, a grant younger than ``offline_ttl`` still counts (or none does, with
``offline_ttl`` 0). Credentials are only ever kept as SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

ANONYMOUS = "anonymous"


def credential_key(authorization: bytes | str | None) -> str:
    """A stable, non-reversible key for the request's Authorization header (``anonymous`` without one)."""
    if not authorization:
        return ANONYMOUS
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    return "sha256:" + hashlib.sha256(authorization.strip()).hexdigest()


class Grants:
    """Bounded memory of (credential, host, repository, digest) -> when upstream last allowed it."""

    def __init__(self, fresh_ttl: float, offline_ttl: float, max_entries: int = 200_000) -> None:
        self.fresh_ttl = fresh_ttl
        self.offline_ttl = offline_ttl
        self.max_entries = max_entries
        self._granted: OrderedDict[tuple[str, str, str, str], float] = OrderedDict()

    def grant(self, credential: str, host: str, repository: str, digests: Iterable[str], now: float) -> None:
        """Record that upstream allowed ``credential`` to read ``digests`` of ``host/repository``."""
        for digest in digests:
            key = (credential, host, repository, str(digest))
            self._granted[key] = now
            self._granted.move_to_end(key)
        while len(self._granted) > self.max_entries:
            self._granted.popitem(last=False)

    def _age(self, credential: str, host: str, repository: str, digest: str, now: float) -> float | None:
        granted = self._granted.get((credential, host, repository, str(digest)))
        return None if granted is None else now - granted

    def is_fresh(self, credential: str, host: str, repository: str, digest: str, now: float) -> bool:
        """True when the grant is young enough to serve without asking upstream."""
        age = self._age(credential, host, repository, digest, now)
        return age is not None and age <= self.fresh_ttl

    def allows_offline(self, credential: str, host: str, repository: str, digest: str, now: float) -> bool:
        """True when, upstream being unreachable, the grant is still young enough to serve."""
        age = self._age(credential, host, repository, digest, now)
        return age is not None and age <= self.offline_ttl

    def revoke(self, credential: str, host: str, repository: str, digest: str) -> None:
        """Forget a grant (upstream refused this credential)."""
        self._granted.pop((credential, host, repository, str(digest)), None)

    def __len__(self) -> int:
        return len(self._granted)
