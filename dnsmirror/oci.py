"""The OCI distribution protocol as plain data: request paths, names, tags, digests, ranges, errors.

Nothing here does I/O (in the sans-IO spirit of h11): the web layer hands in the raw request path
and headers, gets frozen dataclasses back, and turns :class:`OCIError` into a response with
``error.status`` and ``error.body()``. Every parser raises only :class:`OCIError` (or a subclass)
for bad input, whatever the input.

Grammar follows the OCI distribution spec: repository names
``[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*`` (at most 255
characters), tags ``[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}``, digests ``algorithm:encoded``. Only
sha256 (64 lower-case hex digits) is supported; a well-formed sha512 digest is recognised and
reported as unsupported so the caller can pass the request through to upstream.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dnsmirror.patterns import normalize_host

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

#: HTTP status for each error code (OCI distribution spec codes, plus the ones the reference
#: registry implementation adds: RANGE_INVALID, TAG_INVALID, UNAVAILABLE, UNKNOWN, ...).
ERROR_STATUS: Mapping[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "TAG_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    # the reference registry answers 405 Method Not Allowed for UNSUPPORTED
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
    "UNAVAILABLE": 503,
    "UNKNOWN": 500,
}

_DEFAULT_MESSAGES: Mapping[str, str] = {
    "BLOB_UNKNOWN": "blob unknown to registry",
    "BLOB_UPLOAD_INVALID": "blob upload invalid",
    "BLOB_UPLOAD_UNKNOWN": "blob upload unknown to registry",
    "DIGEST_INVALID": "provided digest did not match uploaded content",
    "MANIFEST_BLOB_UNKNOWN": "manifest references a manifest or blob unknown to registry",
    "MANIFEST_INVALID": "manifest invalid",
    "MANIFEST_UNKNOWN": "manifest unknown to registry",
    "NAME_INVALID": "invalid repository name",
    "NAME_UNKNOWN": "repository name not known to registry",
    "SIZE_INVALID": "provided length did not match content length",
    "TAG_INVALID": "invalid tag",
    "UNAUTHORIZED": "authentication required",
    "DENIED": "requested access to the resource is denied",
    "UNSUPPORTED": "the operation is unsupported",
    "TOOMANYREQUESTS": "too many requests",
    "RANGE_INVALID": "requested range not satisfiable",
    "UNAVAILABLE": "service unavailable",
    "UNKNOWN": "unknown error",
}

#: Content type of an error body.
ERROR_CONTENT_TYPE = "application/json"


class OCIError(Exception):
    """A protocol error that becomes an OCI error response.

    ``code`` is the OCI error code, ``status`` the HTTP status (the code's usual one unless
    given), ``detail`` any JSON-serialisable value for the ``detail`` field.
    """

    def __init__(self, code: str, message: str | None = None, detail: Any = None, status: int | None = None):
        self.code = code
        self.message = message if message is not None else _DEFAULT_MESSAGES.get(code, code.lower())
        self.detail = detail
        self.status = status if status is not None else ERROR_STATUS.get(code, 400)
        super().__init__(f"{code}: {self.message}")

    def body(self) -> bytes:
        """The JSON response body ``{"errors": [{"code", "message", "detail"}]}``."""
        return error_body([(self.code, self.message, self.detail)])


def error_body(errors: Iterable[tuple[str, str, Any]]) -> bytes:
    """Encode ``(code, message, detail)`` triples as an OCI error body; ``detail`` None is omitted."""
    entries = []
    for code, message, detail in errors:
        entry: dict[str, Any] = {"code": code, "message": message}
        if detail is not None:
            entry["detail"] = detail
        entries.append(entry)
    return json.dumps({"errors": entries}, separators=(",", ":"), default=str).encode()


class RangeNotSatisfiable(OCIError):
    """A ``Range`` that does not overlap the content; answer 416 with ``content_range``."""

    def __init__(self, total: int):
        super().__init__("RANGE_INVALID", f"range not satisfiable for content of {total} bytes", status=416)
        self.total = total
        #: Value for the ``Content-Range`` header of the 416 response.
        self.content_range = f"bytes */{total}"


# ---------------------------------------------------------------------------------------------
# Names, tags, digests
# ---------------------------------------------------------------------------------------------

#: Longest repository name accepted (the spec's historical "less than 256 characters").
MAX_NAME_LENGTH = 255
#: Longest tag (the tag grammar allows 128 characters).
MAX_TAG_LENGTH = 128
#: Longest request path (without query) accepted at all; real ones are a few hundred bytes.
MAX_PATH_LENGTH = 2048

_NAME_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_ALGORITHM = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
_DIGEST_ENCODED = re.compile(r"[a-zA-Z0-9=_-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")

#: Digest algorithms this mirror can verify and cache.
SUPPORTED_ALGORITHMS = frozenset({"sha256"})
#: Algorithms recognised (well-formed digests accepted) though not verified by this mirror.
KNOWN_ALGORITHMS: Mapping[str, re.Pattern[str]] = {"sha256": _HEX64, "sha512": _HEX128}


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise ``OCIError(NAME_INVALID)``."""
    if not name:
        raise OCIError("NAME_INVALID", "empty repository name")
    if len(name) > MAX_NAME_LENGTH:
        raise OCIError("NAME_INVALID", f"repository name longer than {MAX_NAME_LENGTH} characters")
    for component in name.split("/"):
        if not _NAME_COMPONENT.fullmatch(component):
            raise OCIError("NAME_INVALID", "invalid repository name", detail={"name": _printable(name)})
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it matches the tag grammar, else raise ``OCIError(TAG_INVALID)``."""
    if not _TAG.fullmatch(tag):
        raise OCIError("TAG_INVALID", "invalid tag", detail={"tag": _printable(tag)})
    return tag


@dataclass(frozen=True)
class Digest:
    """A well-formed content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    encoded: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    @property
    def supported(self) -> bool:
        """True if this mirror can verify (and so cache) content by this digest."""
        return self.algorithm in SUPPORTED_ALGORITHMS

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """The sha256 digest of ``data`` (for small in-memory content such as manifests)."""
        return cls("sha256", hashlib.sha256(data).hexdigest())


def parse_digest(text: str) -> Digest:
    """Parse ``algorithm:encoded``.

    sha256 needs exactly 64 lower-case hex digits and sha512 128; any other algorithm, or a
    malformed string, raises ``OCIError(DIGEST_INVALID)``. Check :attr:`Digest.supported`
    (or call :func:`require_supported`) before treating the digest as verifiable.
    """
    algorithm, sep, encoded = text.partition(":")
    if not sep or not _DIGEST_ALGORITHM.fullmatch(algorithm) or not _DIGEST_ENCODED.fullmatch(encoded):
        raise OCIError("DIGEST_INVALID", "invalid digest", detail={"digest": _printable(text)})
    pattern = KNOWN_ALGORITHMS.get(algorithm)
    if pattern is None:
        raise OCIError(
            "DIGEST_INVALID", f"unknown digest algorithm {algorithm!r}", detail={"digest": _printable(text)}
        )
    if not pattern.fullmatch(encoded):
        raise OCIError(
            "DIGEST_INVALID",
            f"invalid {algorithm} digest (lower-case hex expected)",
            detail={"digest": _printable(text)},
        )
    return Digest(algorithm, encoded)


def require_supported(digest: Digest) -> Digest:
    """Return ``digest`` if supported, else raise ``OCIError(UNSUPPORTED)`` with status 400.

    The spec asks for 400 Bad Request when a digest uses an unsupported algorithm.
    """
    if not digest.supported:
        raise OCIError(
            "UNSUPPORTED",
            f"digest algorithm {digest.algorithm} is not supported",
            detail={"digest": str(digest)},
            status=400,
        )
    return digest


def _printable(text: str) -> str:
    """A bounded, printable rendering of client input for error details."""
    text = text[:300]
    return text if text.isprintable() else repr(text)


# ---------------------------------------------------------------------------------------------
# Request paths
# ---------------------------------------------------------------------------------------------


class Endpoint(enum.Enum):
    """Which distribution endpoint a request path addresses."""

    BASE = "base"  # /v2/
    CATALOG = "catalog"  # /v2/_catalog
    MANIFEST = "manifest"  # /v2/<name>/manifests/<tag-or-digest>
    BLOB = "blob"  # /v2/<name>/blobs/<digest>
    UPLOAD = "upload"  # /v2/<name>/blobs/uploads/ (start) or .../uploads/<session>
    TAGS = "tags"  # /v2/<name>/tags/list
    REFERRERS = "referrers"  # /v2/<name>/referrers/<digest>
    OTHER = "other"  # anything else (token endpoints, ...): passed through upstream


@dataclass(frozen=True)
class DistributionPath:
    """A parsed request path.

    ``name`` is set for every per-repository endpoint; ``reference`` is the raw last segment
    (tag, digest or upload session); ``digest`` / ``tag`` hold the parsed form of it.
    """

    endpoint: Endpoint
    path: str
    name: str | None = None
    reference: str | None = None
    digest: Digest | None = None
    tag: str | None = None
    upload_session: str | None = None

    @property
    def by_digest(self) -> bool:
        """True for a blob or manifest addressed by a digest this mirror can verify and cache."""
        return (
            self.endpoint in (Endpoint.BLOB, Endpoint.MANIFEST)
            and self.digest is not None
            and self.digest.supported
        )


# percent-escapes that could smuggle a separator, a dot segment, a NUL or a backslash past us
_DANGEROUS_ESCAPE = re.compile(r"%(?:2[fFeE]|00|5[cC])")


def _check_path(path: str) -> None:
    if not path.startswith("/"):
        raise OCIError("NAME_INVALID", "request path must start with '/'")
    if len(path) > MAX_PATH_LENGTH:
        raise OCIError("NAME_INVALID", f"request path longer than {MAX_PATH_LENGTH} characters")
    if any(not (0x21 <= ord(char) <= 0x7E) for char in path):
        raise OCIError("NAME_INVALID", "request path contains a control, space or non-ASCII character")
    if "\\" in path:
        raise OCIError("NAME_INVALID", "request path contains a backslash")
    if _DANGEROUS_ESCAPE.search(path):
        raise OCIError("NAME_INVALID", "request path contains a percent-encoded '/', '.', '\\' or NUL")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise OCIError("NAME_INVALID", "request path contains a '.' or '..' segment")


def parse_path(raw: str | bytes) -> DistributionPath:
    """Parse a raw (not percent-decoded) request path; a query string, if any, is ignored.

    Paths outside ``/v2/`` and unknown ``/v2/`` shapes give :attr:`Endpoint.OTHER`; odd paths
    (``..`` or ``.`` segments, percent-encoded slashes or dots, NUL and other control bytes,
    non-ASCII, overlong) raise ``OCIError(NAME_INVALID)``. Bad names, tags and digests raise
    the matching OCI error.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise OCIError("NAME_INVALID", "request path contains a non-ASCII byte") from None
    path = raw.split("?", 1)[0]
    _check_path(path)

    if path in ("/v2", "/v2/"):
        return DistributionPath(Endpoint.BASE, path)
    if not path.startswith("/v2/"):
        return DistributionPath(Endpoint.OTHER, path)
    if path in ("/v2/_catalog", "/v2/_catalog/"):
        return DistributionPath(Endpoint.CATALOG, path)

    segments = path[len("/v2/") :].split("/")
    # the endpoint is decided by the tail, since names may themselves contain "blobs" etc.
    if len(segments) >= 3 and segments[-2] == "manifests":
        name = validate_name("/".join(segments[:-2]))
        reference = segments[-1]
        if ":" in reference:
            return DistributionPath(Endpoint.MANIFEST, path, name, reference, digest=parse_digest(reference))
        return DistributionPath(Endpoint.MANIFEST, path, name, reference, tag=validate_tag(reference))
    if len(segments) >= 3 and segments[-2] == "blobs" and segments[-1] != "uploads":
        name = validate_name("/".join(segments[:-2]))
        return DistributionPath(Endpoint.BLOB, path, name, segments[-1], digest=parse_digest(segments[-1]))
    if len(segments) >= 3 and segments[-2:] == ["blobs", "uploads"]:
        return DistributionPath(Endpoint.UPLOAD, path, validate_name("/".join(segments[:-2])))
    if len(segments) >= 4 and segments[-3:-1] == ["blobs", "uploads"]:
        name = validate_name("/".join(segments[:-3]))
        session = segments[-1] or None
        return DistributionPath(Endpoint.UPLOAD, path, name, segments[-1] or None, upload_session=session)
    if len(segments) >= 3 and segments[-2:] == ["tags", "list"]:
        return DistributionPath(Endpoint.TAGS, path, validate_name("/".join(segments[:-2])))
    if len(segments) >= 3 and segments[-2] == "referrers":
        name = validate_name("/".join(segments[:-2]))
        return DistributionPath(
            Endpoint.REFERRERS, path, name, segments[-1], digest=parse_digest(segments[-1])
        )
    return DistributionPath(Endpoint.OTHER, path)


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------

#: Largest manifest this mirror reads or caches (as the spec's reference implementations do).
MANIFEST_MAX_SIZE = 4 * 1024 * 1024

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

#: Media types of an image manifest (one platform).
IMAGE_MANIFEST_TYPES = frozenset(
    {OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED}
)
#: Media types of an index / manifest list (several platforms).
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
#: Every manifest media type served from ``/manifests/``.
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES


def bare_media_type(content_type: str | None) -> str | None:
    """``Content-Type`` without parameters, lower-cased (``None`` or empty gives ``None``)."""
    if not content_type:
        return None
    bare = content_type.split(";", 1)[0].strip().lower()
    return bare or None


def _load_manifest(body: bytes) -> dict[str, Any]:
    if len(body) > MANIFEST_MAX_SIZE:
        raise OCIError("MANIFEST_INVALID", f"manifest larger than {MANIFEST_MAX_SIZE} bytes")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise OCIError("MANIFEST_INVALID", "manifest is not valid JSON") from None
    if not isinstance(document, dict):
        raise OCIError("MANIFEST_INVALID", "manifest is not a JSON object")
    return document


def manifest_media_type(body: bytes, content_type: str | None = None) -> str | None:
    """The manifest's media type: its ``mediaType`` field, else the bare ``content_type``.

    Raises ``OCIError(MANIFEST_INVALID)`` when ``body`` is not a JSON object.
    """
    media_type = _load_manifest(body).get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    return bare_media_type(content_type)


# ---------------------------------------------------------------------------------------------
# Ranges
# ---------------------------------------------------------------------------------------------

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


@dataclass(frozen=True)
class ByteRange:
    """Inclusive byte positions ``start``..``end`` of content of ``total`` bytes."""

    start: int
    end: int
    total: int

    @property
    def length(self) -> int:
        """Number of bytes in the range (the 206 response's Content-Length)."""
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        """Value of the 206 response's ``Content-Range`` header."""
        return content_range(self.start, self.end, self.total)


def content_range(start: int, end: int, total: int) -> str:
    """``bytes start-end/total``."""
    return f"bytes {start}-{end}/{total}"


def parse_range(header: str | bytes | None, total: int) -> ByteRange | None:
    """Interpret a ``Range`` header against content of ``total`` bytes.

    Returns ``None`` when the whole content should be sent (no header, a syntax this mirror does
    not handle such as several ranges or another unit: RFC 9110 lets a server ignore those).
    Supports ``bytes=N-``, ``bytes=N-M`` (M clamped to the end) and ``bytes=-N`` (last N bytes).
    Raises :class:`RangeNotSatisfiable` when the range starts at or past the end of the content.
    """
    if header is None:
        return None
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(header) > 200:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or total == 0:
            raise RangeNotSatisfiable(total)
        return ByteRange(max(0, total - suffix), total - 1, total)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid range-spec: ignore the header
    if start >= total:
        raise RangeNotSatisfiable(total)
    end = min(int(last), total - 1) if last else total - 1
    return ByteRange(start, end, total)


# ---------------------------------------------------------------------------------------------
# Hosts
# ---------------------------------------------------------------------------------------------

# Docker Hub's short name does not serve the registry API; clients talk to this host instead.
_HOST_ALIASES: Mapping[str, str] = {"docker.io": "registry-1.docker.io"}


def upstream_host(sni_host: str) -> str:
    """The registry host to contact for a TLS server name (``docker.io`` -> ``registry-1.docker.io``).

    Lower-cases and drops a trailing dot; every other host maps to itself.
    """
    host = normalize_host(sni_host)
    return _HOST_ALIASES.get(host, host)
