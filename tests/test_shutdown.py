"""SIGTERM: DNS fails open at once, HTTPS keeps serving while captured answers expire, then exit."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
from dns_support import dig, dig_answers, dnsmirror_serve, free_port, unbound, wait_until

pytestmark = pytest.mark.integration

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_sigterm_fails_open_first_and_drains_for_the_answer_ttl(tmp_path):
    ca_dir = tmp_path / "ca"
    subprocess.run([sys.executable, "-m", "dnsmirror", "ca", "init", "--dir", str(ca_dir)], check=True,
                   capture_output=True, timeout=60)
    https_port = free_port()
    with unbound(tmp_path, [f"{ECR}. 300 IN A 192.0.2.99"]) as upstream:
        overrides = {
            "dns": {"upstreams": [f"127.0.0.1:{upstream}"], "ttl": 2},
            "https": {"listen": [f"127.0.0.1:{https_port}"]},
            "health": {"interval": "200ms", "timeout": "100ms", "targets": []},
            "tls": {"ca_cert": str(ca_dir / "ca.crt"), "ca_key": str(ca_dir / "ca.key")},
            "cache": {"dir": str(tmp_path / "cache")},
        }

        def answer() -> str:
            answers = dig_answers(dig(port, ECR, timeout=1).stdout)
            return answers[0][3] if answers else ""

        with dnsmirror_serve(tmp_path, overrides) as (port, process, log):
            assert wait_until(lambda: answer() == "127.0.0.1", 10), log.read_text()
            process.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            assert wait_until(lambda: answer() == "192.0.2.99", 1.5), log.read_text()
            assert accepts(https_port)  # clients holding the captured answer still reach the mirror
            assert process.wait(timeout=15) == 0
            drained = time.monotonic() - stopped_at
        assert 2.5 <= drained < 8, drained
        assert not accepts(https_port)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job


def _https_mirror(tmp_path, ttl: int) -> tuple[dict, int]:
    """Overrides for a mirror with an HTTPS listener (its CA made here) whose drain lasts ``ttl`` + 1 s, and
    that listener's port."""
    ca_dir = tmp_path / "ca"
    subprocess.run([sys.executable, "-m", "dnsmirror", "ca", "init", "--dir", str(ca_dir)], check=True,
                   capture_output=True, timeout=60)
    https_port = free_port()
    overrides = {
        "dns": {"ttl": ttl},
        "https": {"listen": [f"127.0.0.1:{https_port}"]},
        "health": {"targets": []},
        "tls": {"ca_cert": str(ca_dir / "ca.crt"), "ca_key": str(ca_dir / "ca.key")},
        "cache": {"dir": str(tmp_path / "cache")},
    }
    return overrides, https_port


def test_sigint_stops_the_mirror_even_when_it_was_started_with_sigint_ignored(tmp_path):
    overrides, https_port = _https_mirror(tmp_path, ttl=1)
    with dnsmirror_serve(tmp_path, overrides, preexec=_ignore_sigint) as (_, process, log):
        assert wait_until(lambda: accepts(https_port), 10), log.read_text()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0, log.read_text()
        assert "dnsmirror stopping" in log.read_text()


def test_a_second_signal_ends_the_drain_at_once(tmp_path):
    overrides, https_port = _https_mirror(tmp_path, ttl=20)
    with dnsmirror_serve(tmp_path, overrides) as (_, process, log):
        assert wait_until(lambda: accepts(https_port), 10)
        process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: "dnsmirror stopping" in log.read_text(), 5)
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - stopped_at < 3  # not the 21 s drain
        assert "Traceback" not in log.read_text()
