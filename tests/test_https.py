"""The HTTPS listener of a real ``dnsmirror serve`` process on loopback, probed with ``openssl s_client``
and Python's ssl client; serve's refusals of unusable CA files; CA rotation without restart."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from twisted.internet.testing import MemoryReactorClock

from dnsmirror import ca, config
from dnsmirror.app import Services
from dnsmirror.https import UnavailableResource

ECR_HOST = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
PATTERNS = config.load().capture

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl not installed (scripts/setup.sh)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(directory: Path, ca_dir: Path, https_port: int, **extra) -> Path:
    document = {
        "dns": {"listen": [f"127.0.0.1:{free_port()}"], "upstreams": [f"127.0.0.1:{free_port()}"]},
        "https": {"listen": [f"127.0.0.1:{https_port}"]},
        "tls": {
            "ca_cert": str(ca_dir / "ca.crt"),
            "ca_key": str(ca_dir / "ca.key"),
            "reload_interval": "200ms",
        },
        "cache": {"dir": str(directory / f"cache-{https_port}")},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        **extra,
    }
    path = directory / f"dnsmirror-{https_port}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run_serve(config_path: Path, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dnsmirror", "serve", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def serving(tmp: Path, ca_dir: Path):
    """``dnsmirror serve`` in a subprocess; yields the HTTPS port once it accepts connections."""
    port = free_port()
    config_path = write_config(tmp, ca_dir, port)
    log_path = tmp / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dnsmirror", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                assert process.poll() is None, log_path.read_text()
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                assert time.monotonic() < deadline, "serve did not listen: " + log_path.read_text()
                time.sleep(0.05)
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def s_client(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                          input="", capture_output=True, text=True, timeout=15)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    ca.init_directory(directory, PATTERNS)
    return directory


@pytest.fixture(scope="module")
def https_port(tmp_path_factory, ca_dir):
    with serving(tmp_path_factory.mktemp("serve"), ca_dir) as port:
        yield port


def test_captured_name_gets_its_own_strictly_valid_leaf(https_port, ca_dir):
    done = s_client(
        https_port,
        "-servername",
        ECR_HOST,
        "-CAfile",
        str(ca_dir / "root.crt"),
        "-verify_return_error",
        "-x509_strict",
        "-verify_hostname",
        ECR_HOST,
        "-alpn",
        "http/1.1",
        "-showcerts",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Verify return code: 0 (ok)" in done.stdout
    assert f"subject=CN = {ECR_HOST}" in done.stdout
    assert "ALPN protocol: http/1.1" in done.stdout
    assert done.stdout.count("-----BEGIN CERTIFICATE-----") == 2  # leaf + intermediate


def test_two_names_get_two_leaves(https_port, ca_dir):
    subjects = set()
    for name in ("docker.io", "europe-west1-docker.pkg.dev"):
        done = s_client(
            https_port,
            "-servername",
            name,
            "-CAfile",
            str(ca_dir / "root.crt"),
            "-verify_return_error",
            "-verify_hostname",
            name,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        subjects.add(next(line for line in done.stdout.splitlines() if line.startswith("subject=")))
    assert subjects == {"subject=CN = docker.io", "subject=CN = europe-west1-docker.pkg.dev"}


@pytest.mark.parametrize("args", [("-servername", "example.com"), ("-noservername",),
                                  ("-servername", "amazonaws.com")])
def test_unknown_name_and_no_sni_are_refused_with_an_alert(https_port, args):
    done = s_client(https_port, *args)
    assert done.returncode != 0
    assert "alert handshake failure" in done.stderr
    assert "BEGIN CERTIFICATE" not in done.stdout and "Cipher is (NONE)" in done.stdout


@pytest.mark.parametrize("version", ["-tls1_1", "-tls1"])
def test_old_tls_versions_are_refused(https_port, version):
    # SECLEVEL=0 so that this client really offers the old version and the refusal is the server's
    done = s_client(https_port, "-servername", "docker.io", version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert done.returncode != 0
    assert "alert protocol version" in done.stderr, done.stderr


def test_tls12_uses_an_ecdhe_aead_suite(https_port):
    done = s_client(https_port, "-servername", "docker.io", "-tls1_2")
    assert done.returncode == 0, done.stderr
    assert "Cipher is ECDHE-ECDSA-AES128-GCM-SHA256" in done.stdout


def test_tls13_picks_aes_128_gcm_even_for_a_client_that_prefers_aes_256(https_port):
    # the listener's order decides: openssl's client (as curl's) offers AES-256-GCM first
    done = s_client(https_port, "-servername", "docker.io", "-tls1_3",
                    "-ciphersuites", "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256")
    assert done.returncode == 0, done.stderr
    assert "Cipher is TLS_AES_128_GCM_SHA256" in done.stdout, done.stdout[-2000:]


def test_unreachable_upstream_answers_502_with_an_oci_error(https_port, ca_dir):
    context = ssl.create_default_context(cafile=str(ca_dir / "root.crt"))
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", https_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="ghcr.io") as tls_socket:
            assert tls_socket.selected_alpn_protocol() == "http/1.1"
            tls_socket.sendall(b"GET /v2/ HTTP/1.1\r\nHost: ghcr.io\r\nConnection: close\r\n\r\n")
            response = http.client.HTTPResponse(tls_socket)
            response.begin()
            body = json.loads(response.read())
    # the upstream resolver (a silent loopback port) cannot resolve ghcr.io
    assert response.status == 502
    assert response.getheader("content-type") == "application/json"
    assert body["errors"][0]["code"] == "UNAVAILABLE"


def test_rotated_ca_files_are_used_without_restart(tmp_path):
    ca_dir = tmp_path / "ca"
    ca.init_directory(ca_dir, PATTERNS)
    with serving(tmp_path, ca_dir) as port:
        before = s_client(
            port, "-servername", "quay.io", "-CAfile", str(ca_dir / "root.crt"), "-verify_return_error"
        )
        assert before.returncode == 0, before.stderr
        old_root = (ca_dir / "root.crt").read_bytes()
        ca.init_directory(ca_dir, PATTERNS, force=True)
        assert (ca_dir / "root.crt").read_bytes() != old_root
        deadline = time.monotonic() + 10
        while True:
            after = s_client(
                port, "-servername", "quay.io", "-CAfile", str(ca_dir / "root.crt"), "-verify_return_error"
            )
            if after.returncode == 0:
                break
            assert time.monotonic() < deadline, after.stdout + after.stderr
            time.sleep(0.2)


# --- serve refuses unusable CA files, naming the file and the fix ------------------------------------------


def test_serve_refuses_a_group_readable_key(tmp_path):
    ca.init_directory(tmp_path / "ca", PATTERNS)
    os.chmod(tmp_path / "ca" / "ca.key", 0o640)
    done = run_serve(write_config(tmp_path, tmp_path / "ca", free_port()))
    assert done.returncode == 2
    assert f"{tmp_path / 'ca' / 'ca.key'}: is accessible by group or others (mode 0640)" in done.stderr
    assert "chmod 600" in done.stderr


def test_serve_refuses_a_ca_that_does_not_cover_a_pattern(tmp_path):
    ca.init_directory(tmp_path / "ca", ["docker.io"])
    done = run_serve(write_config(tmp_path, tmp_path / "ca", free_port(), capture=["docker.io", "quay.io"]))
    assert done.returncode == 2
    assert "capture pattern 'quay.io'" in done.stderr and "dnsmirror ca constraints" in done.stderr


def test_serve_refuses_a_missing_ca(tmp_path):
    done = run_serve(write_config(tmp_path, tmp_path / "nowhere", free_port()))
    assert done.returncode == 2
    assert str(tmp_path / "nowhere" / "ca.key") in done.stderr and "dnsmirror ca init" in done.stderr


def test_serve_names_the_https_address_it_cannot_bind(tmp_path, ca_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_serve(write_config(tmp_path, ca_dir, port))
    assert done.returncode == 2
    assert f"https.listen[0]: cannot listen on 127.0.0.1:{port}" in done.stderr


def test_serve_refuses_an_unsafe_peer_secret_and_names_a_peer_port_it_cannot_bind(tmp_path, ca_dir):
    secret = tmp_path / "peer-secret"
    secret.write_text("a-long-enough-cluster-secret\n")
    secret.chmod(0o644)
    def peers(port: int) -> dict:
        return {"listen": f"127.0.0.1:{port}", "static": [f"127.0.0.2:{port}"], "secret_file": str(secret)}

    done = run_serve(write_config(tmp_path, ca_dir, free_port(), peers=peers(free_port())))
    assert done.returncode == 2
    assert f"peers.secret_file: {secret} is accessible by group or others" in done.stderr

    secret.chmod(0o600)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_serve(write_config(tmp_path, ca_dir, free_port(), peers=peers(port)))
    assert done.returncode == 2
    assert f"peers.listen: cannot listen on 127.0.0.1:{port}" in done.stderr


# --- in process: the DNS fails open as soon as the HTTPS listener stops -----------------------------------


class MemoryReactorWithUdp(MemoryReactorClock):
    """MemoryReactorClock records TCP listens; the DNS also binds UDP, which only needs to succeed here."""

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        return _StoppablePort()


class _StoppablePort:
    def stopListening(self):
        return None


def test_stopping_https_turns_health_off_at_once(ca_dir):
    document = {"dns": {"listen": ["127.0.0.1:5353"], "upstreams": ["127.0.0.1:5399"]},
                "https": {"listen": ["127.0.0.1:8443"]},
                "tls": {"ca_cert": str(ca_dir / "ca.crt"), "ca_key": str(ca_dir / "ca.key")}}
    reactor = MemoryReactorWithUdp()
    services = Services(config.parse_document(document), reactor, web_site=UnavailableResource("test"))
    services.start()
    assert (8443, "127.0.0.1") in [(entry[0], entry[3]) for entry in reactor.tcpServers]
    services.health.set(True, "probe says so")
    assert services.responder.capture_enabled
    services.stop()
    assert not services.health.healthy and services.health.reason == "HTTPS listener stopped"
    assert not services.responder.capture_enabled
