"""Debian's ``docker-registry`` (distribution 2.8) as the "real" upstream registry in a namespace.

TLS with a certificate from the test public CA (:mod:`harness.pki`), filesystem storage in a temp
dir, optional htpasswd (bcrypt) auth, and an access log (one combined-log line per request on the
registry's stdout) that tests read to count requests:

    with Registry(registry_ns, "123456789012.dkr.ecr.us-east-1.amazonaws.com", ca, workdir,
                  users={"alice": "secret"}) as registry:
        ...
        assert registry.count_requests("GET", f"/v2/team/app/blobs/{digest}") == 1

``redirect_base_url`` makes blob GETs answer a 307 to a second host (see :mod:`harness.blobhost`);
``extra_config`` is deep-merged into the YAML config for anything else (e.g. ``proxy.remoteurl``
for a pull-through cache, whose upstream it verifies against ``trust_file``). :meth:`Registry.corrupt_blob`
makes it serve bytes that do not match their digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .netns import HarnessError, Namespace, Process, clean_env
from .pki import ServerCert, TestCA

# combined log format: addr - user [time] "METHOD PATH PROTO" status size "referer" "agent"
_ACCESS_LINE = re.compile(
    r'^(?P<client>\S+) \S+ (?P<user>\S+) \[[^\]]*\] "(?P<method>\S+) (?P<path>\S+) \S+" '
    r"(?P<status>\d{3}) (?P<size>\S+)"
)


@dataclass(frozen=True)
class AccessLogEntry:
    """One request as the registry logged it."""

    client: str
    user: str
    method: str
    path: str
    status: int
    size: int = 0  # body bytes the registry sent ("-" in the log: none)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def htpasswd_file(users: Mapping[str, str], path: str | os.PathLike[str]) -> Path:
    """Write an htpasswd file with a bcrypt hash (``htpasswd -B``) for each ``user: password``."""
    path = Path(path)
    lines = []
    for user, password in users.items():
        done = subprocess.run(
            ["htpasswd", "-Bbn", user, password], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise HarnessError(f"htpasswd: {done.stderr.strip()}")
        lines.append(done.stdout.strip())
    path.write_text("\n".join(lines) + "\n")
    return path


class Registry:
    """A TLS docker-registry listening on ``namespace.address:port``, named ``hostname``."""

    def __init__(self, namespace: Namespace, hostname: str, ca: TestCA, workdir: str | os.PathLike[str], *,
                 users: Mapping[str, str] | None = None, port: int = 443, address: str | None = None,
                 redirect_base_url: str | None = None, extra_config: Mapping[str, Any] | None = None,
                 trust_file: str | os.PathLike[str] | None = None) -> None:
        self.namespace = namespace
        self.hostname = hostname
        self.address = address or namespace.address
        self.port = port
        self.users = dict(users or {})
        self.workdir = Path(workdir)
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.tls: ServerCert = ca.issue_server([hostname], self.workdir / "tls", ip_addresses=[self.address])
        self.redirect_base_url = redirect_base_url
        self.extra_config = dict(extra_config or {})
        self.trust_file = trust_file
        self.process: Process | None = None

    @property
    def netloc(self) -> str:
        """``host[:port]`` as clients write it in image references."""
        return self.hostname if self.port == 443 else f"{self.hostname}:{self.port}"

    def config(self) -> dict[str, Any]:
        """The registry's configuration (written as YAML; JSON is YAML)."""
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{self.address}:{self.port}",
                "secret": secrets.token_hex(16),
                "tls": {"certificate": str(self.tls.chain_path), "key": str(self.tls.key_path)},
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.users:
            path = htpasswd_file(self.users, self.workdir / "htpasswd")
            config["auth"] = {"htpasswd": {"realm": "dnsmirror-test", "path": str(path)}}
        if self.redirect_base_url:
            # blob GETs answer 307 to BASE/docker/registry/v2/blobs/sha256/xx/<hex>/data (see
            # harness.blobhost)
            config["middleware"] = {
                "storage": [{"name": "redirect", "options": {"baseurl": self.redirect_base_url}}]
            }
        return _merge(config, self.extra_config)

    def start(self, timeout: float = 15) -> Registry:
        """Write the config, start the registry in its namespace and wait until it listens."""
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self.process = self.namespace.start(
            ["docker-registry", "serve", str(self.config_path)],
            "docker-registry",
            env=clean_env(ssl_cert_file=self.trust_file),
        )
        self.process.wait_listening(self.port, timeout)
        return self

    def stop(self) -> None:
        """Stop the registry (its storage stays, so it can be started again)."""
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def access_log(self) -> list[AccessLogEntry]:
        """Every request logged so far, oldest first."""
        if self.process is None:
            return []
        entries = []
        for line in self.process.whole_lines():
            match = _ACCESS_LINE.match(line)
            if match:
                size = int(match["size"]) if match["size"].isdigit() else 0
                entries.append(AccessLogEntry(match["client"], match["user"], match["method"], match["path"],
                                              int(match["status"]), size))
        return entries

    def count_requests(self, method: str, path: str, status: int | None = None) -> int:
        """How many ``METHOD path`` requests (with that status, if given) the registry has logged."""
        return sum(
            1
            for entry in self.access_log()
            if entry.method == method and entry.path == path and (status is None or entry.status == status)
        )

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (served as they are, never re-verified)."""
        algorithm, hex_digest = digest.split(":", 1)
        return (
            self.storage_dir / "docker/registry/v2/blobs" / algorithm / hex_digest[:2] / hex_digest / "data"
        )

    def place_blob(self, repository: str, chunks: Iterable[bytes]) -> tuple[str, Path]:
        """Write the bytes of ``chunks`` into the storage as a layer of ``repository``; return its digest
        and file. Much faster than a push for big blobs; the registry serves it like a pushed layer."""
        blobs = self.storage_dir / "docker/registry/v2/blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=blobs, delete=False) as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
        name = f"sha256:{digest.hexdigest()}"
        path = self.blob_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out.name, path)
        link = (self.storage_dir / "docker/registry/v2/repositories" / repository / "_layers/sha256"
                / digest.hexdigest() / "link")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_text(name)
        return name, path

    def corrupt_blob(self, digest: str) -> None:
        """Flip the bytes of a stored blob, keeping its size: the registry then serves content that does
        not match its digest (for digest-mismatch tests)."""
        path = self.blob_file(digest)
        path.write_bytes(bytes(byte ^ 0xFF for byte in path.read_bytes()))

    def blob_path(self, repository: str, digest: str) -> str:
        """The URL path of a blob, as it appears in the access log."""
        return f"/v2/{repository}/blobs/{digest}"

    def manifest_path(self, repository: str, reference: str) -> str:
        """The URL path of a manifest (by tag or digest), as it appears in the access log."""
        return f"/v2/{repository}/manifests/{reference}"
