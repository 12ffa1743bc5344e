"""Host name patterns: which registry names dnsmirror captures.

A pattern is a DNS name whose labels may hold ``*``:

* a label that is exactly ``*`` matches one or more whole labels
  (``*.dkr.ecr.*.amazonaws.com`` matches ``1234.dkr.ecr.us-east-1.amazonaws.com``);
* a ``*`` inside a label matches one or more characters of that label only
  (``*-docker.pkg.dev`` matches ``europe-west1-docker.pkg.dev``).

Matching is case-insensitive and tolerates a trailing dot. Every pattern must end in at least two
literal labels, so that no pattern can capture a whole top-level domain; that literal suffix is also
what the CA's name constraints permit (see :func:`literal_suffix`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_LABEL_CHARS = re.compile(r"^[a-z0-9_*-]+$")
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class PatternError(ValueError):
    """A capture or skip pattern that cannot be used; the message says why."""


def normalize_host(name: str) -> str:
    """Lower-case a host name and drop one trailing dot."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def is_valid_host(name: str) -> bool:
    """True for a syntactically valid DNS host name (already normalised)."""
    if not name or len(name) > 253:
        return False
    return all(_HOST_LABEL.match(label) for label in name.split("."))


def _label_regex(label: str) -> str:
    if label == "*":
        return r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*"
    return "[a-z0-9_-]+".join(re.escape(part) for part in label.split("*"))


@dataclass(frozen=True)
class Pattern:
    """One validated host pattern."""

    text: str
    regex: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """Validate ``text`` and compile it; raises :class:`PatternError` with the reason."""
        if not isinstance(text, str):
            raise PatternError(f"must be a string, not {type(text).__name__}")
        norm = normalize_host(text.strip())
        if not norm:
            raise PatternError("is empty")
        labels = norm.split(".")
        for label in labels:
            if not label:
                raise PatternError(f"{text!r} has an empty label")
            if not _LABEL_CHARS.match(label):
                raise PatternError(
                    f"{text!r} has a label with characters other than a-z 0-9 - _ *: {label!r}"
                )
            if "**" in label:
                raise PatternError(f"{text!r} has '**' in label {label!r}")
            if len(label.replace("*", "x")) > 63:
                raise PatternError(f"{text!r} has a label longer than 63 characters")
        suffix = _literal_labels(labels)
        if len(suffix) < 2:
            raise PatternError(
                f"{text!r} must end in at least two labels without '*' "
                "(e.g. '*.azurecr.io'), so it cannot capture a whole top-level domain"
            )
        regex = re.compile(r"\.".join(_label_regex(label) for label in labels) + r"\Z")
        return cls(text=norm, regex=regex)

    def matches(self, host: str) -> bool:
        """True when the (normalised) host name matches this pattern."""
        return self.regex.match(host) is not None

    @property
    def literal_suffix(self) -> str:
        """The trailing labels without any ``*``: the DNS subtree this pattern lives in."""
        return ".".join(_literal_labels(self.text.split(".")))


def _literal_labels(labels: list[str]) -> list[str]:
    suffix: list[str] = []
    for label in reversed(labels):
        if "*" in label:
            break
        suffix.insert(0, label)
    return suffix


def literal_suffix(pattern: str) -> str:
    """The literal DNS suffix of a pattern string (see :attr:`Pattern.literal_suffix`)."""
    return Pattern.parse(pattern).literal_suffix


class HostMatcher:
    """Capture/skip decision for host names: captured when a capture pattern matches and no skip
    pattern does (skip always wins)."""

    def __init__(self, capture: Iterable[str], skip: Iterable[str] = ()) -> None:
        self.capture = tuple(Pattern.parse(p) for p in capture)
        self.skip = tuple(Pattern.parse(p) for p in skip)
        self._capture_re = _union(self.capture)
        self._skip_re = _union(self.skip)

    def captures(self, host: str) -> bool:
        """True when ``host`` (any case, trailing dot allowed) is to be captured."""
        name = normalize_host(host)
        if not is_valid_host(name):
            return False
        if self._capture_re is None or not self._capture_re.match(name):
            return False
        return self._skip_re is None or not self._skip_re.match(name)

    def matching_pattern(self, host: str) -> Pattern | None:
        """The first capture pattern that matches ``host``, ignoring skip patterns."""
        name = normalize_host(host)
        return next((p for p in self.capture if p.matches(name)), None)


def _union(patterns: tuple[Pattern, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p.regex.pattern})" for p in patterns))
