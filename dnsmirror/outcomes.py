"""What a source of content answers for one request: a body to stream, a refusal to pass on, or "not here".

Sources (:mod:`dnsmirror.sources`) only decide; :mod:`dnsmirror.respond` turns an outcome into the
response, and nothing else writes to the request. ``source`` names where the answer came from, for the
access log (the values :mod:`dnsmirror.access` documents); None leaves the request's label as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dnsmirror import oci
from dnsmirror.contracts import UpstreamAnswer
from dnsmirror.store import BlobReader
from dnsmirror.streaming import Fill


@dataclass(frozen=True)
class NotHere:
    """This source has nothing for the request: the chain asks the next one."""

    why: str = ""


@dataclass(frozen=True)
class FromFill:
    """A fill under way (or just ended): every waiter streams from its growing file."""

    fill: Fill
    source: str


@dataclass(frozen=True)
class FromCache:
    """A cached blob, open and (when the request needs it) verified; ``finished(intact)`` closes it."""

    reader: BlobReader
    # not yet known intact: hashed as it streams, its last bytes held until the digest matches
    check_digest: bool
    damaged: Callable[[], None]
    finished: Callable[[bool | None], object]
    source: str = "cache"


@dataclass(frozen=True)
class Manifest:
    """A cached manifest read whole and verified."""

    body: bytes
    content_type: str | None
    source: str = "cache"


@dataclass(frozen=True)
class Uncached:
    """Upstream's 200 streamed without the cache, verified as it streams."""

    response: UpstreamAnswer
    content_type: str
    source: str = "relay"


@dataclass(frozen=True)
class UncachedWanted:
    """The cache cannot serve this request: upstream answers it without the cache."""


@dataclass(frozen=True)
class PassOn:
    """The request goes to upstream as it is, with the client's credentials; upstream's answer is the
    client's."""


@dataclass(frozen=True)
class Relayed:
    """Upstream's own answer (a refusal, an error), relayed as sent."""

    response: UpstreamAnswer
    source: str | None = "upstream"


@dataclass(frozen=True)
class Failed:
    """An OCI error of dnsmirror's own."""

    error: oci.OCIError
    source: str | None = None
    headers: dict[bytes, bytes] | None = None


#: a body to stream
Body = FromFill | FromCache | Manifest | Uncached | UncachedWanted
#: a refusal to pass on
Refusal = PassOn | Relayed | Failed
Outcome = NotHere | Body | Refusal
