"""The ``dnsmirror`` command's rough edges: every refusal is one clear line, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

DNSMIRROR = [sys.executable, "-m", "dnsmirror"]


def run(*args, timeout=60, **kwargs):
    return subprocess.run(
        [*DNSMIRROR, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def refused(done) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_ca_init_refuses_a_file_as_dir(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert "exists and is not a directory" in refused(run("ca", "init", "--dir", target))


def test_ca_init_refuses_a_dir_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "cannot create the directory" in refused(run("ca", "init", "--dir", tmp_path / "file" / "ca"))


def test_ca_init_creates_missing_parents(tmp_path):
    done = run("ca", "init", "--dir", tmp_path / "a" / "b")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "b" / "ca.crt").exists()


@pytest.mark.parametrize(("days", "expected"), [("-5", "--days: must be at least 1, got -5"),
                                                ("0", "--days: must be at least 1, got 0"),
                                                ("4000", "exceeds --root-days 3650")])
def test_ca_init_refuses_bad_validity_and_leaves_nothing(tmp_path, days, expected):
    directory = tmp_path / "ca"
    assert expected in refused(run("ca", "init", "--dir", directory, "--days", days))
    assert not directory.exists()


def test_ca_init_into_a_closed_pipe_has_no_traceback(tmp_path):
    reader = subprocess.Popen(["true"], stdin=subprocess.PIPE)
    reader.wait(timeout=10)
    done = subprocess.run([*DNSMIRROR, "ca", "init", "--dir", str(tmp_path / "ca")], stdout=reader.stdin,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    reader.stdin.close()
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert (tmp_path / "ca" / "ca.key").exists()


def test_ca_check_warns_about_the_root_key_and_counts_patterns(tmp_path):
    assert run("ca", "init", "--dir", tmp_path / "ca").returncode == 0
    config = tmp_path / "c.yaml"
    config.write_text(f"capture: ['docker.io']\ntls:\n  ca_cert: {tmp_path}/ca/root.crt\n"
                      f"  ca_key: {tmp_path}/ca/root.key\n")
    done = run("ca", "check", "--config", config)
    assert done.returncode == 0, done.stderr
    assert "self-signed root CA" in done.stderr and "keep the root key offline" in done.stderr
    assert "covers the capture pattern" in done.stdout and "1 capture patterns" not in done.stdout
    good = tmp_path / "good.yaml"
    good.write_text(f"tls:\n  ca_cert: {tmp_path}/ca/ca.crt\n  ca_key: {tmp_path}/ca/ca.key\n")
    done = run("ca", "check", "--config", good)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "covers all 14 capture patterns" in done.stdout


def test_ca_init_days_are_honoured(tmp_path):
    assert run("ca", "init", "--dir", tmp_path / "ca", "--days", "10", "--root-days", "20").returncode == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == 10


def test_help_is_plain_text_with_defaults():
    top = run("--help").stdout
    assert "``" not in top and ".venv/bin/dnsmirror" in top
    init = run("ca", "init", "--help").stdout
    assert "(default: 365)" in init and "(default: 3650)" in init
    for command in (["serve"], ["config", "check"], ["ca", "csr"], ["ca", "check"], ["ca", "constraints"]):
        text = run(*command, "--help").stdout
        options = [
            line for line in text.splitlines() if line.strip().startswith("--") and "--help" not in line
        ]
        for line in options:
            assert len(line.split(None, 2)) == 3, f"{command}: option without help: {line!r}"


def test_serve_prints_a_start_error_once(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"tls:\n  ca_cert: {tmp_path}/missing.crt\n  ca_key: {tmp_path}/missing.key\n"
                      f"cache:\n  dir: {tmp_path}/cache\n")
    done = run("serve", "--config", config, timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "missing.key" in line]
    assert len(lines) == 1, done.stderr


def test_version_is_printed():
    from dnsmirror import __version__

    assert run("--version").stdout.strip() == f"dnsmirror {__version__}"


def test_license_is_the_apache_license():
    root = Path(__file__).resolve().parent.parent
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = "Apache-2.0"' in (root / "pyproject.toml").read_text()


def test_serve_refuses_a_config_still_marked_placeholder(tmp_path):
    """The ConfigMap's example values are never what an operator wants: serve names each mark and stops
    before listening (config check only warns about them)."""
    config = tmp_path / "c.yaml"
    config.write_text(
        f"cache:\n  dir: {tmp_path}/cache\n"
        "dns:\n  # PLACEHOLDER: your resolvers\n  upstreams: ['169.254.169.253:53']\n"
    )
    stderr = refused(run("serve", "--config", config, timeout=60))
    assert "PLACEHOLDER" in stderr and "line 4: marked PLACEHOLDER" in stderr, stderr
    assert "not serving" in stderr
    assert not (tmp_path / "cache").exists()  # stopped before anything was set up
    checked = run("config", "check", config)
    assert checked.returncode == 0 and "line 4: marked PLACEHOLDER" in checked.stderr
