"""Default upstreams from resolv.conf follow the rules ``dns.upstreams`` is checked against."""

from __future__ import annotations

from dnsmirror.config import MAX_DNS_UPSTREAMS, HostPort
from dnsmirror.dns.resolvconf import default_upstreams, nameservers


def test_nameservers_in_order_comments_and_junk_skipped():
    text = (
        "# a comment\nnameserver 10.0.0.2 # inline\nnameserver fe80::1%eth0\nnameserver not-an-ip\nsearch x\n"
    )
    assert nameservers(text) == ["10.0.0.2", "fe80::1"]


def test_each_resolver_once_ours_skipped_at_most_six(tmp_path):
    resolv = tmp_path / "resolv.conf"
    lines = ["nameserver 169.254.20.53", "nameserver 10.0.0.2", "nameserver 10.0.0.2", "nameserver fd00::53",
             "nameserver fd00:0::53", *[f"nameserver 10.0.1.{i}" for i in range(1, 9)]]
    resolv.write_text("\n".join(lines) + "\n")
    chosen = default_upstreams([HostPort("169.254.20.53", 53)], resolv)
    assert chosen[:3] == [HostPort("10.0.0.2", 53), HostPort("fd00::53", 53), HostPort("10.0.1.1", 53)]
    assert len(chosen) == MAX_DNS_UPSTREAMS == 6
    assert default_upstreams([], tmp_path / "missing") == []
