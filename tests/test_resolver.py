"""Upstream name resolution: pure policy and cache, then real lookups against a loopback DNS responder."""

from __future__ import annotations

import ipaddress

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase
from upstream_support import LocalDnsResponder, start_dns

from dnsmirror.config import HostPort
from dnsmirror.resolver import (
    AddressPolicy,
    AddressRefused,
    HostNotFound,
    Resolution,
    ResolutionCache,
    ResolutionFailed,
    ResolutionTimeout,
    UpstreamResolver,
    follow_chain,
    internal_reason,
    normalize_name,
)

# --- pure parts ---------------------------------------------------------------------------------------


class PolicyTests(SynchronousTestCase):
    def test_internal_addresses_are_named(self):
        for address, reason in [
            ("127.0.0.1", "loopback"), ("::1", "loopback"), ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
            ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"),
            ("::ffff:127.0.0.1", "loopback"),
        ]:
            self.assertIn(reason, internal_reason(ipaddress.ip_address(address)) or "", address)

    def test_private_and_public_addresses_are_not_internal(self):
        for address in ["10.1.2.3", "172.16.0.9", "192.168.1.1", "fd00::5", "52.94.1.1", "2600:1f18::1"]:
            self.assertIsNone(internal_reason(ipaddress.ip_address(address)), address)

    def test_default_policy_refuses_internal_allows_private(self):
        policy = AddressPolicy()
        self.assertIsNotNone(policy.refusal("127.0.0.1"))
        self.assertIsNotNone(policy.refusal("169.254.169.254", 80))
        self.assertIsNone(policy.refusal("10.0.0.7", 443))

    def test_allow_internal_permits_loopback(self):
        self.assertIsNone(AddressPolicy(allow_internal=True).refusal("127.0.0.1", 443))

    def test_own_listener_is_refused_even_when_internal_allowed(self):
        policy = AddressPolicy.guarding(
            True, [HostPort("0.0.0.0", 443), HostPort("127.0.0.1", 8443)], ["10.0.0.9", None]
        )
        self.assertIn("loop", policy.refusal("10.0.0.9", 443))
        self.assertIn("loop", policy.refusal("127.0.0.1", 8443))
        self.assertIsNone(policy.refusal("10.0.0.9", 5000))
        self.assertIsNone(policy.refusal("127.0.0.1", 443))
        # the port is unknown: only an address refused on every port is refused
        self.assertIsNone(policy.refusal("10.0.0.9"))


class CacheTests(SynchronousTestCase):
    def test_entry_expires_at_its_time(self):
        clock = task.Clock()
        cache = ResolutionCache(clock=clock.seconds)
        cache.put(Resolution("a.test", ("10.0.0.1",), expires=5.0))
        self.assertEqual(cache.get("a.test").addresses, ("10.0.0.1",))
        clock.advance(5)
        self.assertIsNone(cache.get("a.test"))

    def test_least_recently_used_entry_goes_first(self):
        cache = ResolutionCache(max_entries=2, clock=lambda: 0.0)
        cache.put(Resolution("a.test", ("10.0.0.1",), 9))
        cache.put(Resolution("b.test", ("10.0.0.2",), 9))
        cache.get("a.test")
        cache.put(Resolution("c.test", ("10.0.0.3",), 9))
        self.assertIsNone(cache.get("b.test"))
        self.assertIsNotNone(cache.get("a.test"))
        self.assertEqual(len(cache), 2)


class NameTests(SynchronousTestCase):
    def test_normalize(self):
        self.assertEqual(normalize_name("Registry.Test."), "registry.test")
        self.assertEqual(normalize_name(b"[::0001]"), "::1")

    def test_follow_chain_through_cnames_with_smallest_ttl(self):
        records = [
            dns.RRHeader(b"a.test", dns.CNAME, payload=dns.Record_CNAME(b"b.test"), ttl=30),
            dns.RRHeader(b"b.test", dns.CNAME, payload=dns.Record_CNAME(b"c.test"), ttl=20),
            dns.RRHeader(b"c.test", dns.A, payload=dns.Record_A("10.0.0.1"), ttl=50),
            dns.RRHeader(b"c.test", dns.A, payload=dns.Record_A("10.0.0.2"), ttl=40),
        ]
        self.assertEqual(follow_chain("a.test", records, dns.A), (["10.0.0.1", "10.0.0.2"], "c.test", 20))

    def test_follow_chain_stops_where_the_answer_ends(self):
        records = [dns.RRHeader(b"a.test", dns.CNAME, payload=dns.Record_CNAME(b"elsewhere.test"), ttl=30)]
        self.assertEqual(follow_chain("a.test", records, dns.A), ([], "elsewhere.test", 30))


# --- real lookups --------------------------------------------------------------------------------------


class _Receiver:
    def __init__(self):
        self.addresses = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution):
        self.resolution = resolution

    def addressResolved(self, address):
        self.addresses.append(address)

    def resolutionComplete(self):
        self.done.callback(self.addresses)


class ResolverTests(TestCase):
    timeout = 20

    def make(self, records, ttl=60, **kwargs) -> tuple[UpstreamResolver, LocalDnsResponder]:
        responder, server = start_dns(self, records, ttl)
        kwargs.setdefault("policy", AddressPolicy(allow_internal=True))
        return UpstreamResolver(
            [server], reactor=reactor, timeout=kwargs.pop("timeout", 1.0), **kwargs
        ), responder

    @defer.inlineCallbacks
    def test_a_and_aaaa_ipv4_first(self):
        resolver, responder = self.make(
            {"registry.test": [("AAAA", "fd00::7"), ("A", "10.0.0.7"), ("A", "10.0.0.8")]}
        )
        addresses = yield resolver.resolve("Registry.Test")
        self.assertEqual(addresses, ["10.0.0.7", "10.0.0.8", "fd00::7"])
        self.assertEqual(sorted(responder.queries), [("registry.test", "A"), ("registry.test", "AAAA")])

    @defer.inlineCallbacks
    def test_cname_whose_target_is_not_in_the_answer_is_followed(self):
        resolver, responder = self.make({
            "registry.test": [("CNAME", "edge.cdn.test")],
            "edge.cdn.test": [("A", "10.9.9.9")],
        })
        addresses = yield resolver.resolve("registry.test")
        self.assertEqual(addresses, ["10.9.9.9"])
        self.assertIn(("edge.cdn.test", "A"), responder.queries)

    @defer.inlineCallbacks
    def test_answers_are_cached_for_their_ttl_and_lookups_merged(self):
        resolver, responder = self.make({"registry.test": [("A", "10.0.0.7")]}, ttl=1)
        first, second = yield defer.gatherResults(
            [resolver.resolve("registry.test"), resolver.resolve("registry.test")]
        )
        self.assertEqual(first, second)
        yield resolver.resolve("registry.test")
        self.assertEqual(len(responder.queries), 2)  # one A + one AAAA for three resolves
        yield task.deferLater(reactor, 1.2, lambda: None)
        yield resolver.resolve("registry.test")
        self.assertEqual(len(responder.queries), 4)

    @defer.inlineCallbacks
    def test_nxdomain_is_host_not_found(self):
        resolver, _ = self.make({})
        error = yield self.assertFailure(resolver.resolve("missing.test"), HostNotFound)
        self.assertIn("NXDOMAIN", str(error))

    @defer.inlineCallbacks
    def test_name_without_addresses_is_host_not_found(self):
        resolver, _ = self.make({"empty.test": []})
        error = yield self.assertFailure(resolver.resolve("empty.test"), HostNotFound)
        self.assertIn("no A or AAAA", str(error))

    @defer.inlineCallbacks
    def test_silent_resolver_is_a_timeout(self):
        resolver, responder = self.make({"slow.test": [("A", "10.0.0.1")]}, timeout=0.3)
        responder.silent.add("slow.test")
        started = reactor.seconds()
        error = yield self.assertFailure(resolver.resolve("slow.test"), ResolutionTimeout)
        self.assertLess(reactor.seconds() - started, 3)
        self.assertIn("no answer", str(error))

    @defer.inlineCallbacks
    def test_servfail_is_a_resolver_error(self):
        resolver, responder = self.make({"broken.test": []})
        responder.servfail.add("broken.test")
        error = yield self.assertFailure(resolver.resolve("broken.test"), ResolutionFailed)
        self.assertIn("Server", str(error))

    @defer.inlineCallbacks
    def test_loopback_answer_refused_by_default(self):
        resolver, _ = self.make(
            {"sneaky.test": [("A", "127.0.0.1"), ("A", "169.254.169.254")]}, policy=AddressPolicy()
        )
        error = yield self.assertFailure(resolver.resolve("sneaky.test", 443), AddressRefused)
        self.assertIn("loopback", str(error))
        self.assertIn("link-local", str(error))

    @defer.inlineCallbacks
    def test_refused_addresses_are_filtered_out(self):
        resolver, _ = self.make(
            {"mixed.test": [("A", "127.0.0.1"), ("A", "10.0.0.3")]}, policy=AddressPolicy()
        )
        self.assertEqual((yield resolver.resolve("mixed.test")), ["10.0.0.3"])

    @defer.inlineCallbacks
    def test_ip_literal_needs_no_query_but_obeys_policy(self):
        resolver, responder = self.make({}, policy=AddressPolicy())
        self.assertEqual((yield resolver.resolve("10.1.1.1")), ["10.1.1.1"])
        yield self.assertFailure(resolver.resolve("[::1]"), AddressRefused)
        self.assertEqual(responder.queries, [])

    @defer.inlineCallbacks
    def test_hostname_resolver_interface(self):
        resolver, _ = self.make({"registry.test": [("A", "10.0.0.7"), ("AAAA", "fd00::7")]})
        receiver = _Receiver()
        resolver.resolveHostName(receiver, "registry.test", 443)
        addresses = yield receiver.done
        self.assertEqual(addresses, [IPv4Address("TCP", "10.0.0.7", 443), IPv6Address("TCP", "fd00::7", 443)])
        receiver = _Receiver()
        resolver.resolveHostName(receiver, "registry.test", 443, addressTypes=[IPv6Address])
        self.assertEqual((yield receiver.done), [IPv6Address("TCP", "fd00::7", 443)])

    @defer.inlineCallbacks
    def test_hostname_resolver_delivers_nothing_on_failure(self):
        resolver, _ = self.make({})
        receiver = _Receiver()
        resolver.resolveHostName(receiver, "missing.test", 443)
        self.assertEqual((yield receiver.done), [])

    def test_no_servers_is_an_error(self):
        with self.assertRaises(ValueError):
            UpstreamResolver([], reactor=reactor)
