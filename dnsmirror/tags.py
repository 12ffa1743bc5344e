"""Last known tag -> digest answers, for answering tags while upstream is unreachable.

Tags are mutable, so a tag is always resolved upstream first; this memory is consulted only when
upstream cannot be reached. Answers are kept per Accept set, because the same tag resolves to an
index for one client and to a single-platform manifest for another.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TagAnswer:
    digest: str
    media_type: str
    size: int
    seen: float


def accepted_types(accept_values: Sequence[bytes] | None) -> frozenset[str]:
    """The media types named by (possibly repeated) Accept headers, parameters dropped."""
    types = set()
    for value in accept_values or []:
        for item in value.split(b","):
            media = item.split(b";", 1)[0].strip().lower()
            if media:
                types.add(media.decode("latin-1"))
    return frozenset(types)


def accept_key(types: frozenset[str]) -> str:
    """A key for a set of accepted media types (order and repetition do not matter)."""
    return hashlib.sha256("\n".join(sorted(types)).encode()).hexdigest()[:16]


class TagMemory:
    """Bounded (host, repository, tag) -> {accept key: TagAnswer}."""

    def __init__(self, max_tags: int = 50_000) -> None:
        self.max_tags = max_tags
        self._tags: OrderedDict[tuple[str, str, str], dict[str, TagAnswer]] = OrderedDict()

    def remember(
        self, host: str, repository: str, tag: str, accepted: frozenset[str], answer: TagAnswer
    ) -> None:
        """Record upstream's answer for a client that accepts ``accepted``."""
        key = (host, repository, tag)
        entry = self._tags.setdefault(key, {})
        entry[accept_key(accepted)] = answer
        self._tags.move_to_end(key)
        while len(self._tags) > self.max_tags:
            self._tags.popitem(last=False)

    def recall(self, host: str, repository: str, tag: str, accepted: frozenset[str]) -> TagAnswer | None:
        """The answer last seen for this Accept set, else the newest one whose media type the client
        accepts (any, when it sent no Accept)."""
        entry = self._tags.get((host, repository, tag))
        if not entry:
            return None
        exact = entry.get(accept_key(accepted))
        if exact is not None:
            return exact
        usable = [a for a in entry.values() if not accepted or a.media_type in accepted or "*/*" in accepted]
        return max(usable, key=lambda answer: answer.seen) if usable else None
