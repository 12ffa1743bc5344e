import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dnsmirror import config
from dnsmirror.config import ConfigError, HostPort, host_port, parse_duration, parse_size


def problems_of(document):
    with pytest.raises(ConfigError) as info:
        config.parse_document(document)
    return dict(info.value.problems)


def test_embedded_default_is_valid_and_on_loopback():
    cfg = config.load()
    assert cfg.dns.listen == (HostPort("127.0.0.1", 5353),)
    assert cfg.https.listen == (HostPort("127.0.0.1", 8443),)
    assert cfg.metrics.listen.host == "127.0.0.1"
    assert cfg.peers.listen.host == "127.0.0.1"
    assert cfg.peers.tls is False  # peer traffic in the clear unless asked for: it costs CPU per byte
    assert "*.dkr.ecr.*.amazonaws.com" in cfg.capture
    assert cfg.cache.max_size == 10 * 2**30
    assert cfg.dns.ttl == 5


def test_user_file_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dns:\n  ttl: 30\n  upstreams: ['10.0.0.2', '[fd00::53]:5353']\nskip: ['nvcr.io']\n")
    cfg = config.load(path)
    assert cfg.dns.ttl == 30
    assert cfg.dns.upstreams == (HostPort("10.0.0.2", 53), HostPort("fd00::53", 5353))
    assert cfg.dns.listen == (HostPort("127.0.0.1", 5353),)
    assert cfg.skip == ("nvcr.io",)
    assert cfg.source == str(path)


def test_every_problem_is_reported_with_its_key_path():
    found = problems_of({
        "capture": ["*", "ok.example.com", "a..b"],
        "mirror": {"address": "::1", "address6": "1.2.3.4"},
        "dns": {"listen": ["x"], "ttl": "five", "allow": ["10.0.0.0/33"], "typo": 1, "timeout": "-1s"},
        "cache": {"max_size": "lots"},
        "peers": {"static": ["10.0.0.1"], "tls": "yes"},
        "log": {"format": "xml"},
        "surprise": True,
    })
    assert set(found) == {
        "capture[0]",
        "capture[2]",
        "mirror.address",
        "mirror.address6",
        "dns.listen[0]",
        "dns.ttl",
        "dns.allow[0]",
        "dns.typo",
        "dns.timeout",
        "cache.max_size",
        "peers.static[0]",
        "peers.tls",
        "log.format",
        "surprise",
    }
    assert "two labels" in found["capture[0]"]
    assert "unknown key" in found["dns.typo"]
    assert "missing port" in found["peers.static[0]"]
    assert "expected true or false" in found["peers.tls"]


def test_an_ipv6_only_node_needs_only_address6():
    ipv6_only = config.parse_document({"mirror": {"address": None, "address6": "fd00::53"}})
    assert (ipv6_only.mirror.address, ipv6_only.mirror.address6) == (None, "fd00::53")
    found = problems_of({"mirror": {"address": None}})
    assert set(found) == {"mirror.address"} and "mirror.address6" in found["mirror.address"]


def test_wrong_section_type_and_empty_lists():
    found = problems_of({"dns": ["not", "a", "mapping"], "https": {"listen": []}, "capture": []})
    assert "expected a mapping" in found["dns"]
    assert "at least one" in found["https.listen"]
    assert "at least one pattern" in found["capture"]


def test_yaml_syntax_and_missing_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dns: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        config.load(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- a\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(top)


@pytest.mark.parametrize(("text", "expected"), [("127.0.0.1:53", HostPort("127.0.0.1", 53)),
                                                 ("[::1]:5353", HostPort("::1", 5353))])
def test_host_port(text, expected):
    assert host_port(text) == expected


@pytest.mark.parametrize("text", ["localhost:53", "1.2.3.4:0", "1.2.3.4:70000", "[::1]", "300.1.1.1:53", ""])
def test_host_port_rejects(text):
    with pytest.raises(ValueError):
        host_port(text)


def test_durations_and_sizes():
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2s") == 2 and parse_duration(3) == 3 and parse_duration("1m") == 60
    assert (
        parse_size("10GiB") == 10 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size(4096) == 4096
    )
    for bad in ("0s", "soon", True, -1):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("0", "big", "1.5PB", False):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_effective_document_round_trips():
    cfg = config.load()
    assert config.parse_document(config.to_document(cfg)) == cfg


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dnsmirror", *args], capture_output=True, text=True, timeout=60
    )


def config_check(tmp_path, name: str, text: str):
    """``dnsmirror config check`` on a file holding ``text``."""
    path = tmp_path / name
    path.write_text(text)
    return run_cli("config", "check", str(path))


def test_config_check_command(tmp_path):
    result = config_check(tmp_path, "good.yaml", "mirror:\n  address: 10.1.2.3\n")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["mirror"]["address"] == "10.1.2.3"

    result = config_check(
        tmp_path, "bad.yaml", "mirror:\n  address: nope\ndns:\n  listen: ['1.2.3.4']\n  bogus: 1\n"
    )
    assert result.returncode != 0
    for key in ("mirror.address", "dns.listen[0]", "dns.bogus"):
        assert key in result.stderr
    assert result.stdout == ""


def test_config_check_never_prints_the_proxy_password(tmp_path):
    result = config_check(
        tmp_path,
        "proxy.yaml",
        "upstream:\n  proxy: http://ci:hunter2@proxy.corp.example:3128\n  no_proxy: [corp.example]\n",
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["upstream"]["proxy"] == "http://ci:***@proxy.corp.example:3128"
    assert "hunter2" not in result.stdout + result.stderr

    result = config_check(tmp_path, "bad-proxy.yaml", "upstream:\n  proxy: https://ci:hunter2@proxy.corp.example:3128\n")
    assert result.returncode != 0 and "upstream.proxy" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_shipped_example_configs_are_valid():
    examples = sorted(Path(__file__).parent.parent.glob("docs/examples/*.yaml"))
    assert len(examples) >= 3
    loaded = {path.name: config.load(path) for path in examples}
    assert loaded["dns-only.yaml"].https.listen == () and loaded["dns-only.yaml"].health.targets
    assert loaded["private-registries.yaml"].cache.offline_grant_ttl == 0
    assert loaded["node.yaml"].cache.containerd_content is not None
    assert loaded["node.yaml"].peers.enabled and loaded["node.yaml"].peers.secret_file is not None


def test_dns_only_mode_needs_a_health_target():
    found = problems_of({"https": {"listen": []}})
    assert "health.targets" in found["https.listen"]
    cfg = config.parse_document({"https": {"listen": []}, "health": {"targets": ["10.96.0.53:443"]}})
    assert cfg.https.listen == () and cfg.health.targets == (HostPort("10.96.0.53", 443),)


def test_dns_upstreams_named_twice_or_more_than_six_are_errors():
    found = problems_of({"dns": {"upstreams": ["10.0.0.2", "10.0.0.3:53", "10.0.0.2:53"]}})
    assert "dns.upstreams[2]" in found and "dns.upstreams[0]" in found["dns.upstreams[2]"]
    found = problems_of({"dns": {"upstreams": [f"10.0.0.{i}" for i in range(1, 8)]}})
    assert "at most 6" in found["dns.upstreams"]
    # the same address on another port is another resolver; IPv6 spellings are compared as addresses
    assert "dns.upstreams[1]" in problems_of({"dns": {"upstreams": ["[fd00::53]:53", "[fd00:0::53]:53"]}})
    config.parse_document({"dns": {"upstreams": ["10.0.0.2", "10.0.0.2:5353"]}})


def test_six_distinct_dns_upstreams_are_accepted():
    cfg = config.parse_document({"dns": {"upstreams": [f"10.0.0.{i}" for i in range(1, 7)]}})
    assert len(cfg.dns.upstreams) == 6


def test_config_check_names_a_duplicate_upstream(tmp_path):
    result = config_check(tmp_path, "dup.yaml", "dns:\n  upstreams: ['10.0.0.2', '10.0.0.2']\n")
    assert result.returncode != 0 and "dns.upstreams[1]" in result.stderr, result.stderr


def test_more_than_one_dns_process_needs_dns_in_a_process_of_its_own():
    problems = problems_of({"dns": {"processes": 2, "own_process": False}})
    assert "dns.own_process: true" in problems["dns.processes"]
    assert config.parse_document({"dns": {"processes": 2}}).dns.processes == 2
    assert config.parse_document({"dns": {"processes": 1, "own_process": False}}).dns.processes == 1
