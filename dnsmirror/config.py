"""Typed, frozen configuration: YAML in, :class:`Config` or a :class:`ConfigError` naming every bad key out.

The embedded default (``default.yaml`` beside this module) holds every key; a user file overrides any
subset of it (mappings merge, lists replace). Values are validated here so that nothing downstream
ever sees a malformed address, pattern or duration.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dnsmirror.patterns import Pattern, PatternError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """Configuration that cannot be used. ``problems`` lists ``(key path, what is wrong)``."""

    def __init__(
        self, path: str, message: str | None = None, *, problems: list[tuple[str, str]] | None = None
    ):
        self.problems: list[tuple[str, str]] = list(problems or [])
        if message is not None:
            self.problems.insert(0, (path, message))
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line per problem: ``key.path: what is wrong`` (the first ``MAX_SHOWN``, then a count)."""
        return "\n".join(f"{path or '<top>'}: {message}" for path, message in self.shown())

    MAX_SHOWN = 20

    def shown(self) -> list[tuple[str, str]]:
        """The problems to print: a file with thousands of bad entries gets a readable error."""
        if len(self.problems) <= self.MAX_SHOWN:
            return self.problems
        more = len(self.problems) - self.MAX_SHOWN
        return [*self.problems[:self.MAX_SHOWN], ("", f"... and {more} more problems")]


@dataclass(frozen=True, order=True)
class HostPort:
    """An IP address and port (``127.0.0.1:53``, ``[::1]:53``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.host).version


@dataclass(frozen=True)
class MirrorConfig:
    address: str | None  # None on an IPv6-only node: captured A queries get an empty answer
    address6: str | None


@dataclass(frozen=True)
class DnsConfig:
    listen: tuple[HostPort, ...]
    upstreams: tuple[HostPort, ...]
    ttl: int
    timeout: float
    allow: tuple[IPNetwork, ...]
    answer_cache_size: int
    own_process: bool = True
    cpu_priority: int = 5
    realtime: bool = True
    processes: int = 1


@dataclass(frozen=True)
class HealthConfig:
    interval: float
    timeout: float
    failures: int
    targets: tuple[HostPort, ...] = ()


@dataclass(frozen=True)
class HttpsConfig:
    listen: tuple[HostPort, ...]


@dataclass(frozen=True)
class TlsConfig:
    ca_cert: Path
    ca_key: Path
    leaf_validity: float = 7 * 86400.0  # seconds a minted leaf is valid (at most 7 days)
    leaf_cache_size: int = 1024         # per-host TLS contexts kept (LRU)
    reload_interval: float = 10.0       # how often the CA files are checked for rotation


@dataclass(frozen=True)
class UpstreamConfig:
    resolvers: tuple[HostPort, ...]
    ca_bundle: Path | None
    connect_timeout: float
    read_timeout: float
    first_byte_timeout: float
    pool_per_host: int
    pool_idle_timeout: float
    allow_internal: bool
    tls_failure_bypass: float = 300.0
    proxy: str | None = None
    no_proxy: tuple[str, ...] = ()


@dataclass(frozen=True)
class CacheConfig:
    dir: Path
    max_size: int
    containerd_content: Path | None
    grant_ttl: float = 300.0
    offline_grant_ttl: float = 86400.0
    stale_tags: bool = True
    direct_writes: bool = True


@dataclass(frozen=True)
class PeersConfig:
    listen: HostPort
    static: tuple[HostPort, ...]
    dns_name: str | None
    secret_file: Path | None
    lookup: int = 3
    timeout: float = 2.0
    refresh: float = 30.0
    resolvers: tuple[HostPort, ...] = ()
    max_uploads: int = 4
    tls: bool = False

    @property
    def enabled(self) -> bool:
        """True when peers are configured (a static list or a DNS name)."""
        return bool(self.static or self.dns_name)


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort | None


@dataclass(frozen=True)
class LogConfig:
    format: str
    level: str
    access: bool = True


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration."""

    capture: tuple[str, ...]
    skip: tuple[str, ...]
    mirror: MirrorConfig
    dns: DnsConfig
    health: HealthConfig
    https: HttpsConfig
    tls: TlsConfig
    upstream: UpstreamConfig
    cache: CacheConfig
    peers: PeersConfig
    metrics: MetricsConfig
    log: LogConfig
    source: str = field(default="<embedded default>", compare=False)


# --- value parsers: each takes (value) and raises ValueError with a message for the user -------------


def _ipv4(value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(_string(value)))
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"not an IPv4 address: {_brief(value)}") from exc


def _ipv6(value: Any) -> str:
    try:
        return str(ipaddress.IPv6Address(_string(value)))
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"not an IPv6 address: {_brief(value)}") from exc


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_show(value)}")
    return value.strip()


def _show(value: Any) -> str:
    return f"{type(value).__name__} {_brief(value)}"


_BRIEF_CHARS = 60


def _brief(value: Any) -> str:
    """``repr(value)``, cut to a readable length: an error never prints a huge value in full."""
    if isinstance(value, list | dict | tuple) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= _BRIEF_CHARS else f"{text[:_BRIEF_CHARS]}... ({len(text)} characters)"


_HOSTPORT = re.compile(
    r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<v4>[0-9.]+)|(?P<bare6>[0-9a-fA-F:]*:[0-9a-fA-F:]*))(?::(?P<port>\d+))?$"
)


def host_port(value: Any, default_port: int | None = None) -> HostPort:
    """Parse ``IP:port`` / ``[IPv6]:port`` (port optional when ``default_port`` is given)."""
    text = _string(value) if not isinstance(value, int) else str(value)
    match = _HOSTPORT.match(text)
    if match and match.group("bare6") is not None:
        # a bare IPv6 address cannot carry a port
        port = None
        host = text
    elif match:
        host = match.group("v6") or match.group("v4")
        port = match.group("port")
    else:
        raise ValueError(f"expected IP:port (e.g. 127.0.0.1:53 or [::1]:53), got {_brief(text)}")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError as exc:
        raise ValueError(f"not an IP address in {_brief(text)}") from exc
    if port is None:
        if default_port is None:
            raise ValueError(f"missing port in {_brief(text)} (e.g. {host}:53)")
        port_number = default_port
    else:
        port_number = int(port)
    if not 0 < port_number < 65536:
        raise ValueError(f"port {port_number} out of range 1-65535 in {_brief(text)}")
    return HostPort(host, port_number)


_DURATION_PART = re.compile(r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h)")
_DURATION_PLAIN = re.compile(r"^\d+(?:\.\d+)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT = "a duration like 2s, 500ms, 1m30s or 1h (units h, m, s, ms)"


def _duration_seconds(value: Any) -> float:
    """Seconds from a number or a (possibly compound) duration; any value >= 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_DURATION_HINT}, got {_show(value)}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got {_brief(value)}")
        return float(value)
    text = _string(value).replace(" ", "")
    if _DURATION_PLAIN.match(text):
        return float(text)
    if text.startswith("-"):
        raise ValueError(f"must not be negative, got {_brief(value)}")
    position, seconds = 0, 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if not match:
            raise ValueError(f"expected {_DURATION_HINT}, got {_brief(value)}")
        seconds += float(match.group("num")) * _DURATION_UNITS[match.group("unit")]
        position = match.end()
    return seconds


def parse_duration(value: Any) -> float:
    """Seconds from ``2s``, ``500ms``, ``1m30s``, ``1h`` or a plain number of seconds; must be > 0."""
    seconds = _duration_seconds(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than zero, got {_brief(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest duration text that :func:`parse_duration` reads back as ``seconds`` (``1m30s``,
    ``500ms``)."""
    millis = round(seconds * 1000)
    if millis == 0 or abs(millis - seconds * 1000) > 1e-6:
        return f"{seconds:g}s"
    if millis % 1000:
        return f"{millis}ms" if millis < 1000 else f"{millis / 1000:g}s"
    whole = millis // 1000
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)


_SIZE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B)?$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: Any) -> int:
    """Bytes from ``10GiB``, ``500MB``, ``1024`` ...; must be > 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 10GiB, got {_show(value)}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(_string(value))
        if not match:
            raise ValueError(f"expected a size like 10GiB or 500MB, got {_brief(value)}")
        size = int(float(match.group("num")) * _SIZE_UNITS[(match.group("unit") or "b").lower()])
    if size <= 0:
        raise ValueError(f"must be greater than zero, got {_brief(value)}")
    return size


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_show(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        number: int = value  # an int by the check above
        return number

    return parse


def _duration_or_zero(value: Any) -> float:
    return _duration_seconds(value)


def _whole_seconds(low: int, high: int) -> Callable[[Any], int]:
    """A time in whole seconds, given as an integer or a duration (``dns.ttl: 30`` or ``30s``)."""

    def parse(value: Any) -> int:
        seconds = _duration_seconds(value)
        if seconds != int(seconds):
            raise ValueError(f"must be whole seconds, got {_brief(value)}")
        if not low <= seconds <= high:
            raise ValueError(
                f"must be between {format_duration(low) if low else 0} and {format_duration(high)}, "
                f"got {_brief(value)}"
            )
        return int(seconds)

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _duration_at_most(limit: float, shown: str) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds > limit:
            raise ValueError(f"must be at most {shown}, got {_brief(value)} ({format_duration(seconds)})")
        return seconds

    parse.duration = True  # type: ignore[attr-defined]
    return parse


def _mirror_ipv4(value: Any) -> str:
    """The address captured names resolve to: one a client can connect to."""
    address = ipaddress.IPv4Address(_ipv4(value))
    if address.is_unspecified:
        raise ValueError(f"{address} is the unspecified address: clients cannot connect to it; give the "
                         "node-local address the HTTPS listener serves (e.g. 169.254.20.53)")
    if address == ipaddress.IPv4Address("255.255.255.255") or address.is_multicast:
        kind = "multicast" if address.is_multicast else "broadcast"
        raise ValueError(f"{address} is a {kind} address: clients cannot connect to it; give the node-local "
                         "address the HTTPS listener serves")
    return str(address)


def _mirror_ipv6(value: Any) -> str:
    address = ipaddress.IPv6Address(_ipv6(value))
    if address.is_unspecified or address.is_multicast:
        raise ValueError(f"{address} is {'the unspecified' if address.is_unspecified else 'a multicast'} "
                         "address: clients cannot connect to it")
    return str(address)


def _network(value: Any) -> IPNetwork:
    try:
        return ipaddress.ip_network(_string(value), strict=False)
    except ValueError as exc:
        raise ValueError(f"not an IP network (e.g. 10.0.0.0/8): {_brief(value)}") from exc


def _path(value: Any) -> Path:
    return Path(_string(value))


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _string(value).lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {_brief(value)}")
        return text

    return parse


def _dns_name(value: Any) -> str:
    from dnsmirror.patterns import is_valid_host, normalize_host

    name = normalize_host(_string(value))
    if not is_valid_host(name):
        raise ValueError(f"not a valid DNS name: {_brief(value)}")
    return name


def _pattern(value: Any) -> str:
    try:
        return Pattern.parse(value).text
    except PatternError as exc:
        raise ValueError(f"bad pattern: {exc}") from exc


def _proxy_url(value: Any) -> str:
    from dnsmirror.egress import EgressProxy

    url = _string(value)
    EgressProxy.parse(url)  # raises ValueError saying what is wrong
    return url


def _no_proxy_entry(value: Any) -> str:
    entry = _string(value)
    if entry != "*":
        _dns_name(entry.lstrip("."))
    return entry


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        return None if value is None else parse(value)

    parse_optional.optional = True  # type: ignore[attr-defined]
    return parse_optional


def _list_of(parse: Callable[[Any], Any]) -> _ListParser:
    parse_list = _ListParser(parse)
    return parse_list


class _ListParser:
    """Marks a key as a list; items are parsed one by one so each error names its index."""

    def __init__(self, item: Callable[[Any], Any]):
        self.item = item


def _upstream_server(value: Any) -> HostPort:
    return host_port(value, default_port=53)


# Section -> key -> parser. The dataclass of each section has the same field names.
_SCHEMA: dict[str, tuple[type, dict[str, Any]]] = {
    "mirror": (MirrorConfig, {"address": _optional(_mirror_ipv4), "address6": _optional(_mirror_ipv6)}),
    "dns": (
        DnsConfig,
        {
            "listen": _list_of(host_port),
            "upstreams": _list_of(_upstream_server),
            "ttl": _whole_seconds(0, 86400),
            "timeout": parse_duration,
            "allow": _list_of(_network),
            "answer_cache_size": _int_range(1, 10_000_000),
            "own_process": _boolean,
            "cpu_priority": _int_range(0, 19),
            "realtime": _boolean,
            "processes": _int_range(1, 64),
        },
    ),
    "health": (
        HealthConfig,
        {
            "interval": parse_duration,
            "timeout": parse_duration,
            "failures": _int_range(1, 100),
            "targets": _list_of(host_port),
        },
    ),
    "https": (HttpsConfig, {"listen": _list_of(host_port)}),
    "tls": (
        TlsConfig,
        {
            "ca_cert": _path,
            "ca_key": _path,
            "leaf_validity": _duration_at_most(7 * 86400.0, "168h (7 days)"),
            "leaf_cache_size": _int_range(1, 1_000_000),
            "reload_interval": parse_duration,
        },
    ),
    "upstream": (
        UpstreamConfig,
        {
            "resolvers": _list_of(_upstream_server),
            "ca_bundle": _optional(_path),
            "connect_timeout": parse_duration,
            "read_timeout": parse_duration,
            "first_byte_timeout": parse_duration,
            "pool_per_host": _int_range(0, 1000),
            "pool_idle_timeout": parse_duration,
            "allow_internal": _boolean,
            "tls_failure_bypass": _duration_or_zero,
            "proxy": _optional(_proxy_url),
            "no_proxy": _list_of(_no_proxy_entry),
        },
    ),
    "cache": (
        CacheConfig,
        {
            "dir": _path,
            "max_size": parse_size,
            "containerd_content": _optional(_path),
            "grant_ttl": parse_duration,
            "offline_grant_ttl": _duration_or_zero,
            "stale_tags": _boolean,
            "direct_writes": _boolean,
        },
    ),
    "peers": (
        PeersConfig,
        {
            "listen": host_port,
            "static": _list_of(host_port),
            "dns_name": _optional(_dns_name),
            "secret_file": _optional(_path),
            "lookup": _int_range(1, 16),
            "timeout": parse_duration,
            "refresh": parse_duration,
            "resolvers": _list_of(_upstream_server),
            "max_uploads": _int_range(1, 64),
            "tls": _boolean,
        },
    ),
    "metrics": (MetricsConfig, {"listen": _optional(host_port)}),
    "log": (
        LogConfig,
        {
            "format": _choice("text", "json"),
            "level": _choice("debug", "info", "warning", "error"),
            "access": _boolean,
        },
    ),
}
_TOP_LISTS = {"capture": _pattern, "skip": _pattern}


def default_text() -> str:
    """The embedded default configuration file, comments included (``dnsmirror config default``)."""
    return resources.files("dnsmirror").joinpath("default.yaml").read_text(encoding="utf-8")


def default_document() -> dict[str, Any]:
    """The embedded default configuration as a plain YAML document."""
    document: dict[str, Any] = yaml.safe_load(default_text())
    return document


_PLACEHOLDER_ACCOUNT = "000000000000."


def placeholder_marks(text: str) -> list[str]:
    """The PLACEHOLDER marks of an example file (the ConfigMap) still in ``text``, one line each."""
    return [
        f"line {number}: marked PLACEHOLDER: replace the value it describes with yours, then remove the mark"
        for number, line in enumerate(text.splitlines(), 1)
        if "PLACEHOLDER" in line
    ]


def placeholder_warnings(text: str, config: Config) -> list[str]:
    """Values an example file (the ConfigMap) marks as to be replaced, still in ``text``."""
    warnings = placeholder_marks(text)
    warnings += [
        f"skip: {entry} is the example's placeholder account: give the registry of your dnsmirror image"
        for entry in config.skip
        if entry.startswith(_PLACEHOLDER_ACCOUNT)
    ]
    return warnings


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` onto ``base``: mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_document(document: Any, source: str = "<document>") -> Config:
    """Validate a user document (merged onto the default) and build the :class:`Config`.

    Raises :class:`ConfigError` listing every problem with its key path.
    """
    problems: list[tuple[str, str]] = []
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        raise ConfigError("", f"the configuration must be a mapping of keys, got {type(document).__name__}")
    for key in document:
        if key not in _SCHEMA and key not in _TOP_LISTS:
            problems.append(
                (
                    _brief(key) if not isinstance(key, str) or len(key) > _BRIEF_CHARS else key,
                    f"unknown key (known: {', '.join(sorted([*_TOP_LISTS, *_SCHEMA]))})",
                )
            )
    for key, value in document.items():
        if key in _SCHEMA and value is not None and not isinstance(value, Mapping):
            problems.append((key, f"expected a mapping of keys, got {_show(value)}"))
    usable = {
        key: value for key, value in document.items()
        if key in _TOP_LISTS or (key in _SCHEMA and isinstance(value, Mapping))
    }
    merged = merge(default_document(), usable)
    built: dict[str, Any] = {}
    for key, item in _TOP_LISTS.items():
        built[key] = tuple(_parse_list(key, merged.get(key), item, problems))
    for section, (cls, keys) in _SCHEMA.items():
        values = merged.get(section) or {}
        for key in values:
            if key not in keys:
                problems.append((f"{section}.{key}", f"unknown key (known in {section}: {', '.join(keys)})"))
        parsed: dict[str, Any] = {}
        for key, parse in keys.items():
            path = f"{section}.{key}"
            value = values.get(key)
            if isinstance(parse, _ListParser):
                parsed[key] = tuple(_parse_list(path, value, parse.item, problems))
                continue
            if value is None and not getattr(parse, "optional", False):
                problems.append((path, "is required"))
                continue
            try:
                parsed[key] = parse(value)
            except ValueError as exc:
                problems.append((path, str(exc)))
        if len(parsed) == len(keys):
            built[section] = cls(**parsed)
    _check_relations(built, problems)
    if problems:
        raise ConfigError("", problems=problems)
    return Config(**built, source=source)


def _parse_list(
    path: str, value: Any, item: Callable[[Any], Any], problems: list[tuple[str, str]]
) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append((path, f"expected a list, got {_show(value)}"))
        return []
    out = []
    for index, element in enumerate(value):
        try:
            out.append(item(element))
        except ValueError as exc:
            problems.append((f"{path}[{index}]", str(exc)))
    return out


MAX_DNS_UPSTREAMS = 6


def upstream_problems(upstreams: tuple[HostPort, ...]) -> list[tuple[str, str]]:
    """What is wrong with ``dns.upstreams``: a resolver named twice, or more than the forwarder tries."""
    problems = []
    if len(upstreams) > MAX_DNS_UPSTREAMS:
        problems.append(("dns.upstreams", f"lists {len(upstreams)} resolvers; at most {MAX_DNS_UPSTREAMS} "
                                          "(each dead one may cost a query one timeout)"))
    seen: dict[tuple[str, int], int] = {}
    for index, upstream in enumerate(upstreams):
        key = (ipaddress.ip_address(upstream.host).compressed, upstream.port)
        if key in seen:
            problems.append((f"dns.upstreams[{index}]", f"{upstream} is already dns.upstreams[{seen[key]}]"))
        else:
            seen[key] = index
    return problems


def _check_relations(built: dict[str, Any], problems: list[tuple[str, str]]) -> None:
    def reported(prefix: str) -> bool:
        return any(path == prefix or path.startswith(prefix + "[") for path, _ in problems)

    mirror = built.get("mirror")
    if mirror is not None and mirror.address is None and mirror.address6 is None:
        problems.append(("mirror.address", "is required unless mirror.address6 is set (an IPv6-only node)"))
    dns = built.get("dns")
    if dns is not None and not dns.listen and not reported("dns.listen"):
        problems.append(("dns.listen", "needs at least one address"))
    if dns is not None:
        problems.extend(upstream_problems(dns.upstreams))
    if dns is not None and dns.processes > 1 and not dns.own_process:
        problems.append(("dns.processes", "needs dns.own_process: true (with false, DNS is answered by the "
                                          "mirror process itself)"))
    https = built.get("https")
    health = built.get("health")
    if (https is not None and health is not None and not https.listen and not health.targets
            and not reported("https.listen") and not reported("health.targets")):
        problems.append(("https.listen", "needs at least one address, unless health.targets names the "
                                         "mirror's HTTPS address (DNS-only mode)"))
    if not built.get("capture") and not any(path.startswith("capture") for path, _ in problems):
        problems.append(("capture", "needs at least one pattern, or dnsmirror captures nothing"))
    peers = built.get("peers")
    if peers is not None:
        for index, peer in enumerate(peers.static):
            if peer.port != peers.listen.port:
                problems.append(
                    (
                        f"peers.static[{index}]",
                        f"port {peer.port} differs from peers.listen's port "
                        f"{peers.listen.port}: every node listens on the same port",
                    )
                )
    if peers is not None and peers.enabled and peers.secret_file is None:
        problems.append(
            (
                "peers.secret_file",
                "is required when peers.static or peers.dns_name is set: peers "
                "serve cached private content only to nodes that hold the secret",
            )
        )
    if health is not None and health.timeout > health.interval:
        problems.append(
            ("health.timeout", f"must not exceed health.interval ({format_duration(health.interval)})")
        )


MAX_FILE_BYTES = 256 * 1024  # the embedded default, every key commented, is 6 KiB
MAX_NESTING = 32


def load(path: str | Path | None = None) -> Config:
    """Load the config file at ``path`` (or only the embedded default when ``None``).

    A hostile file costs at most a second and ``MAX_FILE_BYTES`` of reading: only regular files up to
    that size are read, strict UTF-8, no YAML anchors or aliases, at most ``MAX_NESTING`` levels, no
    duplicated key; each refusal is a :class:`ConfigError` of one line.
    """
    if path is None:
        return parse_document({}, source="<embedded default>")
    path = Path(path)
    document = parse_yaml(read_text(path), str(path))
    return parse_document(document, source=str(path))


def read_text(path: Path) -> str:
    """The text of a config file: a regular file of at most ``MAX_FILE_BYTES``, strict UTF-8."""
    try:
        # non-blocking: opening a named pipe must not wait for a writer
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ConfigError("", f"{path} is not a regular file (a device, pipe or directory): give a "
                                      "YAML file")
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            "", f"{path} is larger than {MAX_FILE_BYTES // 1024} KiB: not a dnsmirror config file"
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) >= 2 and b"\x00" in data[:2]):
        raise ConfigError("", f"{path} is UTF-16 encoded: save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError("", f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}): "
                              "save it as UTF-8") from exc


if TYPE_CHECKING:
    _Constructor = yaml.constructor.SafeConstructor
else:  # a mix-in: the loader it is mixed into brings the constructor
    _Constructor = object


class _NoDuplicateKeys(_Constructor):
    """A constructor mix-in refusing a key that appears twice in one mapping (YAML keeps the last
    silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: PyYAML's own error follows
            if first is not None:
                raise _Refused(f"key {_brief(key)} appears twice (first at line {first.line + 1}); the "
                               "second would silently replace the first", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class _StrictLoader(_NoDuplicateKeys, yaml.SafeLoader):
    """The pure-Python SafeLoader without anchors, aliases, deep nesting or duplicated keys."""

    depth = 0

    # the scanner looks ahead over every open flow collection: refuse deep nesting as it is scanned
    def fetch_flow_collection_start(self, token_class: type[yaml.Token]) -> None:
        if self.flow_level >= MAX_NESTING:
            raise _Refused(f"nested deeper than {MAX_NESTING} levels", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def add_indent(self, column: int) -> bool:
        if len(self.indents) >= MAX_NESTING:
            raise _Refused(f"nested deeper than {MAX_NESTING} levels", self.get_mark())
        return super().add_indent(column)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("YAML anchors and aliases (&name, *name) are not accepted: write each value out",
                           event.start_mark)
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _Refused(f"nested deeper than {MAX_NESTING} levels", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


# libyaml parses a large file ten times faster; its events are checked before it builds anything
_CLoader: Any = getattr(yaml, "CSafeLoader", None)
if _CLoader is not None:
    class _FastStrictLoader(_NoDuplicateKeys, yaml.CSafeLoader):
        """libyaml's SafeLoader refusing duplicated keys (anchors, aliases and depth: see
        :func:`_check_events`)."""


def _check_events(text: str) -> None:
    """Refuse anchors, aliases and nesting deeper than ``MAX_NESTING`` from libyaml's event stream."""
    depth = 0
    for event in yaml.parse(text, Loader=_CLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("YAML anchors and aliases (&name, *name) are not accepted: write each value out",
                           event.start_mark)
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise _Refused(f"nested deeper than {MAX_NESTING} levels", event.start_mark)
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1


class _Refused(yaml.YAMLError):
    def __init__(self, problem: str, mark: object) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


def parse_yaml(text: str, source: str = "<document>") -> Any:
    """The YAML document in ``text``, parsed with :class:`_StrictLoader`; :class:`ConfigError` if unusable."""
    try:
        if _CLoader is not None:
            _check_events(text)
            loader: _FastStrictLoader | _StrictLoader = _FastStrictLoader(text)
        else:
            loader = _StrictLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        kind = "refused" if isinstance(exc, _Refused) else "is not valid YAML"
        raise ConfigError("", f"{source} {kind}{where}: {problem}") from exc
    except RecursionError as exc:
        raise ConfigError("", f"{source} is nested too deeply") from exc


def _is_duration(parse: Any) -> bool:
    return parse in (parse_duration, _duration_or_zero) or getattr(parse, "duration", False)


def to_document(config: Config) -> dict[str, Any]:
    """The effective configuration as plain YAML-friendly data (for ``config check``).

    Durations are written as durations (``1m30s``), so the output reads back as the same config.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, HostPort | Path) or isinstance(
            value, ipaddress.IPv4Network | ipaddress.IPv6Network
        ):
            return str(value)
        if hasattr(value, "__dataclass_fields__"):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        return value

    document: dict[str, Any] = plain(config)
    document.pop("source", None)
    for section, (_, keys) in _SCHEMA.items():
        for key, parse in keys.items():
            if _is_duration(parse) and isinstance(document[section].get(key), float):
                document[section][key] = format_duration(document[section][key])
    if config.upstream.proxy:
        from dnsmirror.egress import redacted_url

        document["upstream"]["proxy"] = redacted_url(config.upstream.proxy)  # printed: never the password
    return document


def describe_size(size: int) -> str:
    """``10000000000 bytes (10 GB = 9.31 GiB)``: both unit systems, since ``GB`` and ``GiB`` differ by 7%."""
    for power, decimal, binary in ((4, "TB", "TiB"), (3, "GB", "GiB"), (2, "MB", "MiB"), (1, "KB", "KiB")):
        if size >= 1000**power:
            return f"{size} bytes ({size / 1000**power:.3g} {decimal} = {size / 1024**power:.3g} {binary})"
    return f"{size} bytes"
