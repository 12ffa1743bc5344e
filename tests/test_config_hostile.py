"""Hostile and mistaken config files: each ends in one clear line, fast and in bounded memory."""

import os
import resource
import subprocess
import sys
import time

import pytest
import yaml

from dnsmirror import config
from dnsmirror.config import ConfigError, format_duration, parse_duration

DNSMIRROR = [sys.executable, "-m", "dnsmirror"]


def check(path, timeout=20):
    """``dnsmirror config check path`` in a child process: (exit status, stderr, seconds, peak RSS KiB)."""
    started = time.monotonic()
    done = subprocess.run([*DNSMIRROR, "config", "check", str(path)], capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stderr, time.monotonic() - started


def refusal(path) -> str:
    with pytest.raises(ConfigError) as info:
        started = time.monotonic()
        try:
            config.load(path)
        finally:
            assert time.monotonic() - started < 1.0
    text = info.value.describe()
    assert "\n" not in text and len(text) < 300, text
    return text


def alias_bomb() -> str:
    lines = ['a0: &a0 ["10.0.0.0/8"]']
    for level in range(1, 12):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 10)}]")
    return "\n".join(lines) + "\ndns:\n  allow: *a11\n"


def test_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert "anchors and aliases" in refusal(path)


def test_a_single_alias_is_refused_too(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("dns:\n  allow: &nets ['10.0.0.0/8']\nhealth:\n  targets: *nets\n")
    assert "line 2" in refusal(path)


def test_deep_nesting_is_refused_without_recursion_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("dns:\n  allow: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert "nest" in refusal(path)  # our limit, or libyaml's own
    shallower = tmp_path / "deep-100.yaml"
    shallower.write_text("dns:\n  allow: " + "[" * 100 + "]" * 100 + "\n")
    assert "nested deeper than 32 levels" in refusal(shallower)
    block = tmp_path / "deep-block.yaml"
    block.write_text("".join(" " * level + f"k{level}:\n" for level in range(600)) + " " * 600 + "k: 1\n")
    assert "nested deeper than 32 levels" in refusal(block)


@pytest.mark.parametrize(("data", "expected"), [
    ("dns:\n  ttl: 5\n".encode("utf-16"), "UTF-16"),
    ("dns:\n  ttl: 5\n".encode("utf-16-le"), "UTF-16"),
    (b"dns:\n  ttl: 5 # caf\xe9\n", "not UTF-8 text (byte 0xe9 at line 2)"),
])
def test_encodings_other_than_utf8_are_named(tmp_path, data, expected):
    path = tmp_path / "encoded.yaml"
    path.write_bytes(data)
    assert expected in refusal(path)


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfdns:\n  ttl: 7\n")
    assert config.load(path).dns.ttl == 7


def test_devices_pipes_and_directories_are_not_read(tmp_path):
    assert "not a regular file" in refusal("/dev/zero")
    assert "Is a directory" in refusal(tmp_path)
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in refusal(fifo)  # and opening it did not wait for a writer


def test_a_huge_file_is_refused_after_reading_at_most_256_kib(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as out:
        out.write(b"# padding\n" * (200 * 1024))
    assert "larger than 256 KiB" in refusal(path)


def test_a_huge_value_is_not_printed_in_full(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(
        yaml.safe_dump({"mirror": {"address": "x" * 200_000}, "dns": {"allow": list(range(5000))}})
    )
    with pytest.raises(ConfigError) as info:
        config.load(path)
    text = info.value.describe()
    assert len(text) < 2000, text[:3000]
    assert "(200002 characters)" in text and "and 4981 more problems" in text


@pytest.fixture(params=["libyaml", "pure"])
def loaders(request, monkeypatch):
    """Every refusal holds with libyaml and with PyYAML's pure-Python parser (where libyaml is missing)."""
    if request.param == "pure":
        monkeypatch.setattr(config, "_CLoader", None)
    return request.param


def test_each_refusal_holds_with_either_parser(tmp_path, loaders):
    cases = {"bomb.yaml": (alias_bomb(), "anchors and aliases"),
             "deep.yaml": ("dns:\n  allow: " + "[" * 20_000 + "]" * 20_000 + "\n", "nest"),
             "twice.yaml": ("log: {}\nlog: {}\n", "appears twice")}
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        assert expected in refusal(path), (loaders, name)


def test_duplicated_keys_are_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("dns:\n  ttl: 5\nmirror:\n  address: 127.0.0.1\ndns:\n  ttl: 9\n")
    text = refusal(path)
    assert "'dns' appears twice (first at line 1)" in text and "line 5" in text


@pytest.mark.parametrize("name", ["bomb", "utf16", "zero", "deep"])
def test_config_check_exits_with_one_line_fast_and_small(tmp_path, name):
    files = {"bomb": alias_bomb().encode(), "utf16": "dns: {}\n".encode("utf-16"),
             "deep": b"dns:\n  allow: " + b"[" * 20_000 + b"]" * 20_000 + b"\n"}
    path = "/dev/zero" if name == "zero" else tmp_path / f"{name}.yaml"
    if name != "zero":
        path.write_bytes(files[name])
    # a memory limit the alias bomb would break (it needed 1.5 GB), applied to the child only
    limit = 400 * 2**20

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    started = time.monotonic()
    done = subprocess.run([*DNSMIRROR, "config", "check", str(path)], capture_output=True, text=True,
                          timeout=30, preexec_fn=cap)
    # process start included; the refusal itself is checked < 1 s above
    assert time.monotonic() - started < 10
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in done.stderr, done.stderr  # the heading and one problem
    assert len(done.stderr) < 400


# --- the config findings of an operator's first day ----------------------------------------------------


def problems_of(document):
    with pytest.raises(ConfigError) as info:
        config.parse_document(document)
    return dict(info.value.problems)


@pytest.mark.parametrize("address", ["0.0.0.0", "255.255.255.255", "224.0.0.1"])
def test_mirror_address_must_be_one_clients_can_connect_to(address):
    found = problems_of({"mirror": {"address": address}})
    assert "clients cannot connect" in found["mirror.address"]


def test_compound_durations_are_read_and_printed():
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1h0m0.5s") == 3600.5
    assert format_duration(90.0) == "1m30s"
    assert format_duration(0.5) == "500ms"
    assert format_duration(604800.0) == "168h"
    for seconds in (0.25, 1.5, 2.0, 59.0, 61.0, 3600.0, 5400.0, 86400.0):
        assert parse_duration(format_duration(seconds)) == seconds
    with pytest.raises(ValueError, match="1m30s"):
        parse_duration("ninety seconds")  # the hint shows that compound durations are accepted


def test_dns_ttl_takes_a_duration_or_seconds():
    assert config.parse_document({"dns": {"ttl": "30s"}}).dns.ttl == 30
    assert config.parse_document({"dns": {"ttl": "1m"}}).dns.ttl == 60
    assert config.parse_document({"dns": {"ttl": 0}}).dns.ttl == 0
    found = problems_of({"dns": {"ttl": "2d"}})
    assert "duration" in found["dns.ttl"]
    assert "between 0 and 24h" in problems_of({"dns": {"ttl": "25h"}})["dns.ttl"]


def test_leaf_validity_reports_the_value_as_written():
    message = problems_of({"tls": {"leaf_validity": "400h"}})["tls.leaf_validity"]
    assert "'400h'" in message and "e+" not in message


def test_invalid_listen_entries_are_not_followed_by_a_misleading_empty_list_problem():
    found = problems_of({"dns": {"listen": ["x", "y"]}, "https": {"listen": ["nope"]}})
    assert set(found) == {"dns.listen[0]", "dns.listen[1]", "https.listen[0]"}


def test_effective_config_prints_durations_as_durations_and_reads_back(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  read_timeout: 1m30s\ncache:\n  max_size: 10GB\n")
    done = subprocess.run(
        [*DNSMIRROR, "config", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    document = yaml.safe_load(done.stdout)
    assert document["upstream"]["read_timeout"] == "1m30s"
    assert document["tls"]["leaf_validity"] == "168h"
    assert document["health"]["timeout"] == "1s"
    assert "10000000000 bytes (10 GB = 9.31 GiB)" in done.stdout  # GB is stated as powers of 1000
    again = tmp_path / "again.yaml"
    again.write_text(done.stdout)
    assert config.load(again) == config.load(path)


def test_placeholders_of_the_configmap_are_pointed_out(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# PLACEHOLDER: your registry\nskip: ['000000000000.dkr.ecr.us-east-1.amazonaws.com']\n")
    done = subprocess.run(
        [*DNSMIRROR, "config", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert "line 1: marked PLACEHOLDER" in done.stderr
    assert "placeholder account" in done.stderr


def test_config_default_prints_the_embedded_default():
    done = subprocess.run([*DNSMIRROR, "config", "default"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout == config.default_text()
    assert config.parse_document(yaml.safe_load(done.stdout)) == config.load()
