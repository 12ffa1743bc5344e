"""Resolution of upstream registry names with dnsmirror's own resolvers, never the node's.

The node's resolver points at dnsmirror itself, so asking it for ``123456789012.dkr.ecr...`` would
answer the mirror's own address. :class:`UpstreamResolver` queries only the configured servers
(``upstream.resolvers``, default ``dns.upstreams``) with :class:`twisted.names.client.Resolver`,
asks for A and AAAA in parallel, follows CNAME chains, caches answers for their TTL (bounded, LRU)
and merges concurrent lookups of one name. It is also an :class:`IHostnameResolver`, so a reactor
wrapper (:class:`dnsmirror.upstream.ResolvingReactor`) can hand it to ``HostnameEndpoint``.

Every address goes through an :class:`AddressPolicy` before anything connects to it. The default
refuses loopback, link-local (including the cloud metadata address 169.254.169.254), unspecified,
multicast and reserved addresses, and any endpoint that is dnsmirror's own HTTPS listener (a loop).
Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) are ALLOWED by default: private registries
and cloud registry VPC endpoints (ECR interface endpoints, Private Link) resolve to them.
``allow_internal=True`` (config ``upstream.allow_internal``) lifts the internal-address refusal,
for tests and for registries on the node itself; the loop guard always applies.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.names import client, dns
from twisted.names import error as names_error
from twisted.python.failure import Failure
from zope.interface import implementer

from dnsmirror.config import HostPort
from dnsmirror.logs import fields

log = logging.getLogger("dnsmirror.resolver")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_CNAME_DEPTH = 8


class ResolutionError(Exception):
    """An upstream host name could not be turned into a usable address."""

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(f"{host}: {message}")


class HostNotFound(ResolutionError):
    """The name does not exist (NXDOMAIN) or has no A/AAAA records."""


class ResolutionTimeout(ResolutionError):
    """No configured resolver answered in time."""


class ResolutionFailed(ResolutionError):
    """A resolver answered with an error (SERVFAIL, REFUSED, ...), or the CNAME chain is broken."""


class AddressRefused(ResolutionError):
    """The name resolved, but only to addresses the policy forbids connecting to."""


# --- pure policy -----------------------------------------------------------------------------------


def internal_reason(address: IPAddress) -> str | None:
    """Why ``address`` is internal to the node (never a remote registry), or ``None``."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return internal_reason(address.ipv4_mapped)
    if address.is_unspecified:
        return "unspecified address"
    if address.is_loopback:
        return "loopback address"
    if address.is_link_local:
        return "link-local address"
    if address.is_multicast:
        return "multicast address"
    if isinstance(address, ipaddress.IPv4Address) and (
        address.is_reserved or address == ipaddress.IPv4Address("255.255.255.255")
    ):
        return "reserved address"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which resolved addresses dnsmirror may connect to.

    ``allow_internal`` permits loopback, link-local, unspecified, multicast and reserved addresses.
    ``refused_endpoints`` are ``(address, port)`` pairs never connected to whatever ``allow_internal``
    says (dnsmirror's own HTTPS listeners: a request there would loop); port ``0`` means any port.
    """

    allow_internal: bool = False
    refused_endpoints: frozenset[tuple[str, int]] = frozenset()

    def refusal(self, address: str, port: int | None = None) -> str | None:
        """Why connecting to ``address`` (on ``port``, if known) is refused, or ``None`` if allowed."""
        ip = ipaddress.ip_address(address)
        canonical = str(ip)
        if (canonical, 0) in self.refused_endpoints or (
            port is not None and (canonical, port) in self.refused_endpoints
        ):
            return "dnsmirror's own listener (request loop)"
        if not self.allow_internal:
            return internal_reason(ip)
        return None

    @classmethod
    def guarding(
        cls, allow_internal: bool, own_listeners: Iterable[HostPort], own_addresses: Iterable[str | None] = ()
    ) -> AddressPolicy:
        """A policy refusing dnsmirror's HTTPS listeners; ``own_addresses`` are refused on their ports.

        A listener on an unspecified address (``0.0.0.0:443``) guards every ``own_addresses`` entry on
        that port, since a client reaches it there.
        """
        listeners = list(own_listeners)
        addresses = [a for a in own_addresses if a]
        endpoints = {(str(ipaddress.ip_address(item.host)), item.port) for item in listeners}
        for item in listeners:
            for address in addresses:
                endpoints.add((str(ipaddress.ip_address(address)), item.port))
        endpoints = {
            (host, port) for host, port in endpoints if not ipaddress.ip_address(host).is_unspecified
        }
        return cls(allow_internal=allow_internal, refused_endpoints=frozenset(endpoints))


@dataclass(frozen=True)
class Resolution:
    """The addresses of one host name (IPv4 first, then IPv6, in answer order) and until when they hold."""

    host: str
    addresses: tuple[str, ...]
    expires: float


class ResolutionCache:
    """Bounded LRU of :class:`Resolution` by host name; an entry lives until its ``expires`` time."""

    def __init__(self, max_entries: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, Resolution] = OrderedDict()

    def get(self, host: str) -> Resolution | None:
        entry = self._entries.get(host)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            del self._entries[host]
            return None
        self._entries.move_to_end(host)
        return entry

    def put(self, resolution: Resolution) -> None:
        self._entries[resolution.host] = resolution
        self._entries.move_to_end(resolution.host)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def normalize_name(host: str | bytes) -> str:
    """Lower-case text name without the trailing dot (IP literals canonicalised)."""
    text = host.decode("ascii") if isinstance(host, bytes) else host
    text = text.strip().rstrip(".").lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def follow_chain(
    name: str, records: Sequence[dns.RRHeader], record_type: int
) -> tuple[list[str], str, int | None]:
    """Walk ``records`` from ``name`` through CNAMEs to ``record_type`` addresses.

    Returns ``(addresses, last name reached, smallest TTL on the way or None)``; when no address is
    found the last name is where a further query must continue.
    """
    current = name
    ttl: int | None = None
    by_name: dict[str, list[dns.RRHeader]] = {}
    for record in records:
        by_name.setdefault(normalize_name(record.name.name), []).append(record)
    for _ in range(MAX_CNAME_DEPTH + 1):
        here = by_name.get(current, [])
        matching = [record for record in here if record.type == record_type]
        if matching:
            ttl = min([record.ttl for record in matching] + ([ttl] if ttl is not None else []))
            # A and AAAA payloads carry an address, CNAME payloads a name
            addresses = [str(ipaddress.ip_address(record.payload.address)) for record in matching]  # type: ignore[union-attr]
            return addresses, current, ttl
        cnames = [record for record in here if record.type == dns.CNAME]
        if not cnames:
            return [], current, ttl
        ttl = cnames[0].ttl if ttl is None else min(ttl, cnames[0].ttl)
        current = normalize_name(cnames[0].payload.name.name)  # type: ignore[union-attr]
    return [], current, ttl


# --- Twisted resolver --------------------------------------------------------------------------------


@implementer(IHostResolution)
class _HostResolution:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@implementer(IHostnameResolver)
class UpstreamResolver:
    """A and AAAA lookups of upstream hosts through ``servers`` only, cached, policy-checked.

    ``resolve(host, port)`` gives clear errors (:class:`HostNotFound`, :class:`ResolutionTimeout`,
    :class:`AddressRefused`, ...); ``resolveHostName`` is the same lookup for ``HostnameEndpoint``,
    which only learns "no addresses" on failure, so callers should ``resolve`` first to get the error.
    """

    def __init__(
        self,
        servers: Sequence[HostPort],
        *,
        reactor,
        timeout: float = 2.0,
        policy: AddressPolicy | None = None,
        cache_size: int = 1024,
        min_ttl: float = 1.0,
        max_ttl: float = 300.0,
    ) -> None:
        if not servers:
            raise ValueError(
                "no upstream resolvers configured (upstream.resolvers and dns.upstreams are empty)"
            )
        self.servers = tuple(servers)
        self.policy = policy or AddressPolicy()
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._reactor = reactor
        # one attempt per server, each `timeout` long; resolv=None: /etc/resolv.conf is never read
        self._names = client.Resolver(
            resolv=None,
            servers=[(s.host, s.port) for s in self.servers],
            timeout=(timeout,),
            reactor=reactor,
        )
        self.timeout = timeout
        self.cache = ResolutionCache(cache_size, clock=reactor.seconds)
        self._waiting: dict[str, list[defer.Deferred]] = {}
        self.queries = 0  # DNS lookups sent (A and AAAA count as one), for tests and metrics

    # public API

    def resolve(self, host: str | bytes, port: int | None = None) -> defer.Deferred:
        """Deferred list of permitted addresses of ``host`` (IPv4 first), or a :class:`ResolutionError`."""
        name = normalize_name(host)
        d = self._lookup(name)
        d.addCallback(self._permitted, name, port)
        return d

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes=None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """:class:`IHostnameResolver`: deliver the permitted addresses (none on any error)."""
        resolution = _HostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        wanted = tuple(addressTypes) if addressTypes else (IPv4Address, IPv6Address)
        kind = "UDP" if transportSemantics == "UDP" else "TCP"

        def deliver(addresses: list[str]) -> None:
            if resolution.cancelled:
                return
            for address in addresses:
                family = IPv6Address if ":" in address else IPv4Address
                if family in wanted:
                    resolutionReceiver.addressResolved(family(kind, address, portNumber))  # type: ignore[arg-type]

        def report(failure: Failure) -> None:
            log.warning("upstream name resolution failed: %s", failure.getErrorMessage(),
                        extra=fields(host=hostName, port=portNumber))

        d = self.resolve(hostName, portNumber or None)
        d.addCallbacks(deliver, report)
        d.addBoth(lambda _: resolutionReceiver.resolutionComplete())
        return resolution

    # lookups

    def _permitted(self, addresses: tuple[str, ...], name: str, port: int | None) -> list[str]:
        allowed: list[str] = []
        refusals: list[str] = []
        for address in addresses:
            reason = self.policy.refusal(address, port)
            if reason is None:
                allowed.append(address)
            else:
                refusals.append(f"{address} ({reason})")
        if not allowed:
            raise AddressRefused(name, "refusing to connect to " + ", ".join(refusals))
        return allowed

    def _lookup(self, name: str) -> defer.Deferred:
        try:
            return defer.succeed((str(ipaddress.ip_address(name)),))
        except ValueError:
            pass
        cached = self.cache.get(name)
        if cached is not None:
            return defer.succeed(cached.addresses)
        waiter: defer.Deferred = defer.Deferred()
        if name in self._waiting:
            self._waiting[name].append(waiter)
            return waiter
        self._waiting[name] = [waiter]
        self.queries += 1
        d = defer.ensureDeferred(self._query_both(name))
        d.addBoth(self._finish, name)
        return waiter

    def _finish(self, result, name: str) -> None:
        waiters = self._waiting.pop(name, [])
        if isinstance(result, Resolution):
            self.cache.put(result)
            for waiter in waiters:
                waiter.callback(result.addresses)
        else:
            for waiter in waiters:
                waiter.errback(result)

    async def _query_both(self, name: str) -> Resolution:
        outcomes = await defer.DeferredList(
            [
                defer.ensureDeferred(self._query(name, dns.A)),
                defer.ensureDeferred(self._query(name, dns.AAAA)),
            ],
            consumeErrors=True,
        )
        addresses: list[str] = []
        ttls: list[float] = []
        errors: list[Failure] = []
        for ok, value in outcomes:
            if ok:
                found, ttl = value
                addresses.extend(found)
                if found and ttl is not None:
                    ttls.append(ttl)
            else:
                errors.append(value)  # type: ignore[arg-type]  # DeferredList: a Failure when not ok
        if not addresses:
            raise self._explain(name, errors)
        ttl_seconds = min(max(min(ttls, default=self.min_ttl), self.min_ttl), self.max_ttl)
        log.debug("resolved upstream host",
                  extra=fields(host=name, addresses=",".join(addresses), ttl=ttl_seconds))
        return Resolution(name, tuple(addresses), self._reactor.seconds() + ttl_seconds)

    async def _query(self, name: str, record_type: int) -> tuple[list[str], int | None]:
        queried = name
        ttl: int | None = None
        lookup = self._names.lookupAddress if record_type == dns.A else self._names.lookupIPV6Address
        for _ in range(MAX_CNAME_DEPTH):
            answers, _authority, _additional = await lookup(queried)
            found, reached, chain_ttl = follow_chain(queried, answers, record_type)
            if chain_ttl is not None:
                ttl = chain_ttl if ttl is None else min(ttl, chain_ttl)
            if found or reached == queried:
                return found, ttl
            # the answer ended on a CNAME whose target it did not include: ask for the target
            queried = reached
        raise ResolutionFailed(name, f"CNAME chain longer than {MAX_CNAME_DEPTH}")

    def _explain(self, name: str, errors: list[Failure]) -> ResolutionError:
        servers = ", ".join(str(s) for s in self.servers)
        for failure in errors:
            if failure.check(ResolutionError):
                return failure.value
        for failure in errors:
            if failure.check(names_error.DNSNameError):
                return HostNotFound(name, f"no such host (NXDOMAIN from {servers})")
        for failure in errors:
            if failure.check(names_error.DNSQueryTimeoutError, defer.TimeoutError):
                return ResolutionTimeout(
                    name, f"no answer from upstream resolvers {servers} within {self.timeout:g}s each"
                )
        for failure in errors:
            if failure.check(names_error.DomainError):
                kind = type(failure.value).__name__.removeprefix("DNS").removesuffix("Error")
                return ResolutionFailed(name, f"resolver error ({kind}) from {servers}")
        if errors:
            return ResolutionFailed(name, f"lookup failed: {errors[0].getErrorMessage()}")
        return HostNotFound(name, f"no A or AAAA records (asked {servers})")
