"""Who may read cached content: the multi-team promise.

A cached blob or manifest is served to a request only when upstream would serve it to that request's
credentials (or to anonymity), in the repository the request names. Asking upstream on every hit would
make the cache pointless, so upstream's own answers leave *grants*: a credential that upstream answered
200 for a digest in repository R (a GET or HEAD by that digest, or a manifest by tag, whose digest is
the manifest served) is granted that digest, in R, for ``fresh_ttl``. Without a fresh grant the caller
asks upstream (a HEAD with the request's own credentials) and records the answer.

What a manifest *references* is never granted: a registry may accept a manifest whose references it has
not checked (OCI distribution 1.1 must accept an absent ``subject``; whether ``layers``, ``blobs`` or an
index's ``manifests`` are checked, and in which scope, differs between registries), so a reference is
only the pusher's claim, not the registry's answer (docs/security.md, "Cached content and teams").

When upstream is unreachable, a grant younger than ``offline_ttl`` still counts (or none does, with
``offline_ttl`` 0). Credentials are only ever kept as SHA-256 hashes.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from collections.abc import Iterable

from dnsmirror import oci

ANONYMOUS = "anonymous"


class Access(enum.Enum):
    """Whether a request may read cached content."""

    ALLOWED = "allowed"
    DENIED = "denied"            # upstream refused: pass the request through so the client sees why
    UNREACHABLE = "unreachable"  # upstream unreachable and no recent grant


def access_from_answer(status: int) -> Access | None:
    """What upstream's status for an authorisation ``HEAD`` says: 200 allows; 5xx and 429 say nothing about
    the credential (None: the offline policy decides); any other answer (401, 403, 404, ...) denies."""
    if status == 200:
        return Access.ALLOWED
    if status >= 500 or status == 429:
        return None
    return Access.DENIED


def granted_by_answer(asked: str, status: int, served_digest: str | None = None) -> str | None:
    """The one digest an upstream answer grants, or None.

    Only a 200 grants, and only the content the answer was about: the digest asked for (``asked`` is
    a digest), or, for a manifest asked by tag, the digest of the manifest served (``served_digest``:
    the sha256 of the body, or the ``Docker-Content-Digest`` of a HEAD). Nothing a manifest refers to
    is ever granted: this function is never shown a manifest body.
    """
    if status != 200:
        return None
    candidate = asked if ":" in asked else served_digest
    if not candidate:
        return None
    try:
        digest = oci.parse_digest(candidate)
    except oci.OCIError:
        return None
    return str(digest) if digest.supported else None


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
