"""``dnsmirror doctor``: what is wrong with dnsmirror on this node, and how to fix it.

Run on a node (or in the dnsmirror pod) with the config dnsmirror serves. Each check prints one line,
``ok``, ``warn``, ``FAIL`` or ``skip``, with what it found; a failed check adds the fix. The exit status
is 0 when no check failed, 1 otherwise. The checks, in order:

- ``ca``: the CA files load as ``serve`` loads them, and do not expire within 30 days;
- ``resolver``: the node resolver's first nameserver (``/etc/resolv.conf``) answers a captured name
  with the mirror address (and, when it does not, whether dnsmirror itself is failing open);
- ``mirror``: the HTTPS mirror answers ``GET /v2/`` on the mirror address;
- ``upstream``: that answer came from the registry (not a 502 saying upstream is unreachable);
- ``trust``: the system trust store (what containerd reads) verifies the mirror's certificate;
- ``cache``: the cache directory is writable, with free space;
- ``containerd``: containerd's content store, when configured, is readable;
- ``peers``: with peers configured, every peer (``peers.static``, and ``peers.dns_name`` resolved through
  ``peers.resolvers``) answers a request signed with this node's secret, over TLS when ``peers.tls`` is
  on (at most :data:`MAX_PEERS_PROBED` of them). A peer that refuses the signature has another secret; one
  whose TLS handshake fails, or that does not answer HTTP, has another ``peers.tls``; one that cannot be
  reached is a warning (a node may be starting, or a firewall closes the port);
- ``image``: with IMAGE, its manifest comes through the mirror.

The captured name checked is IMAGE's registry, or else the first capture pattern without a wildcard.
The mirror address is ``mirror.address`` (an A answer), or ``mirror.address6`` (AAAA) on an IPv6-only
node.
Every connection goes to the mirror address (the registry's name is only sent as TLS server name), so
the checks never depend on the node resolver they examine.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import ipaddress
import json
import os
import select
import shutil
import socket
import ssl
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dnslib import QTYPE, DNSRecord

from dnsmirror import config as configmod
from dnsmirror.config import Config, HostPort
from dnsmirror.dns.resolvconf import nameservers
from dnsmirror.patterns import HostMatcher

if TYPE_CHECKING:
    from OpenSSL import SSL

TIMEOUT = 5.0
# peers asked by the peers check: enough to see a pattern, bounded on a large cluster
MAX_PEERS_PROBED = 16
# the digest the peers check asks for: of bytes no image holds, so every peer answers 404
PROBE_DIGEST = "sha256:" + hashlib.sha256(b"dnsmirror doctor: peer probe").hexdigest()
MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))


@dataclass(frozen=True)
class Result:
    """The outcome of one check: ``status`` is ok, warn, FAIL or skip."""

    check: str
    status: str
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        shown = [f"{self.status:<4} {self.check:<10} {self.detail}"]
        if self.fix and self.status in ("FAIL", "warn"):
            shown.append(f"{'':<4} {'':<10} fix: {self.fix}")
        return shown


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


# --- the checks ------------------------------------------------------------------------------------------


class Doctor:
    """Runs the checks against ``config``; ``resolv_conf`` is the node resolver's configuration."""

    def __init__(
        self, config: Config, image: str | None = None, resolv_conf: Path = Path("/etc/resolv.conf"),
        *, dns_port: int = 53,
    ) -> None:
        self.config = config
        self.dns_port = dns_port  # the port of resolv.conf's nameservers (always 53 on a node)
        self.image = parse_reference(image) if image else None
        self.resolv_conf = resolv_conf
        self.matcher = HostMatcher(config.capture, config.skip)
        self.name = self.image[0] if self.image else example_name(config.capture, self.matcher)
        listen = config.https.listen[0] if config.https.listen else None
        self.port = listen.port if listen else 443
        # an IPv6-only node has no mirror.address: its captured names resolve (AAAA) to mirror.address6
        mirror = config.mirror.address or config.mirror.address6
        if mirror is None:
            raise ValueError("mirror.address or mirror.address6 is required")  # the config ensures one
        self.mirror = mirror
        self.qtype = "A" if config.mirror.address else "AAAA"
        self.endpoint = str(HostPort(mirror, self.port))
        self.v2: Reply | OSError | None = None

    def run(self) -> Iterator[Result]:
        yield self.check_ca()
        if self.image is not None and not self.matcher.captures(self.image[0]):
            yield Result(
                "image",
                "FAIL",
                f"{self.image[0]} is not captured: its pulls do not go through dnsmirror",
                "add the registry to capture (and recreate the CA), or remove it from skip",
            )
            return
        yield self.check_resolver()
        yield self.check_mirror()
        yield self.check_upstream()
        yield self.check_trust()
        yield self.check_cache()
        yield self.check_containerd()
        yield self.check_peers()
        if self.image is not None:
            yield self.check_image()

    def check_ca(self) -> Result:
        from dnsmirror import ca

        tls = self.config.tls
        try:
            authority, warnings = ca.load_authority(tls.ca_cert, tls.ca_key, self.config.capture)
        except ca.CaError as exc:
            return Result("ca", "FAIL", f"{exc.path}: {exc.problem}", exc.fix)
        days = (authority.not_after.timestamp() - time.time()) / 86400
        detail = f"{tls.ca_cert} valid until {authority.not_after:%Y-%m-%d} ({days:.0f} days)"
        if warnings:
            return Result("ca", "warn", detail + "; " + "; ".join(warnings),
                          "rotate the CA (docs/security.md, 'Rotating the CA')")
        return Result("ca", "ok", detail)

    def check_resolver(self) -> Result:
        mirror = self.mirror
        try:
            servers = nameservers(self.resolv_conf.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            return Result("resolver", "FAIL", f"cannot read {self.resolv_conf}: {exc.strerror or exc}",
                          "run doctor where the node's /etc/resolv.conf is visible (on the node, or the pod)")
        if not servers:
            return Result(
                "resolver",
                "FAIL",
                f"{self.resolv_conf} names no nameserver",
                f"make dnsmirror ({mirror}) the first nameserver (manifests/node-setup/node-setup.sh)",
            )
        first = servers[0]
        try:
            answers = query_addresses(first, self.dns_port, self.name, self.qtype)
        except OSError as exc:
            return Result("resolver", "FAIL", f"the node resolver {first} did not answer {self.name}: {exc}",
                          f"make dnsmirror ({mirror}) the first nameserver of {self.resolv_conf}")
        if answers == [mirror]:
            return Result(
                "resolver", "ok", f"the node resolver {first} answers {self.name} with the mirror {mirror}"
            )
        found = ", ".join(answers) or "no address"
        if first not in self._dns_addresses():
            return Result(
                "resolver",
                "FAIL",
                f"the node resolver {first} answers {self.name} with {found}, not the "
                f"mirror {mirror}: it is not dnsmirror",
                f"make dnsmirror ({mirror}) the first nameserver of {self.resolv_conf}, keeping the "
                "others after it (manifests/node-setup/node-setup.sh does this)",
            )
        return Result(
            "resolver",
            "FAIL",
            f"dnsmirror ({first}) answers {self.name} with {found}: it is failing open "
            "because the mirror is unhealthy",
            f"see the mirror check below and http://{self._metrics_address()}/readyz",
        )

    def check_mirror(self) -> Result:
        try:
            self.v2 = https_get(self.mirror, self.port, self.name, "/v2/", verify=False)
        except OSError as exc:
            self.v2 = exc
            return Result(
                "mirror",
                "FAIL",
                f"no HTTPS answer from the mirror at {self.endpoint} for {self.name}: {describe(exc)}",
                "check that dnsmirror runs on this node (kubectl -n dnsmirror get pods -o wide) and "
                "its log; https.listen must include the mirror address",
            )
        return Result("mirror", "ok", f"the mirror at {self.endpoint} answers GET /v2/ for {self.name} "
                      f"({self.v2.status})")

    def check_upstream(self) -> Result:
        if not isinstance(self.v2, Reply):
            return Result("upstream", "skip", "the mirror did not answer")
        if self.v2.status in (502, 503, 504):
            reason = error_message(self.v2.body) or f"status {self.v2.status}"
            return Result(
                "upstream",
                "FAIL",
                f"the mirror cannot reach {self.name}: {reason}",
                "let the node reach the registry on port 443 (egress rules, upstream.proxy), and check "
                "upstream.resolvers / dns.upstreams resolve it",
            )
        return Result("upstream", "ok", f"{self.name} answered the mirror's GET /v2/ ({self.v2.status})")

    def check_trust(self) -> Result:
        try:
            https_get(self.mirror, self.port, self.name, "/v2/", verify=True)
        except ssl.SSLCertVerificationError as exc:
            return Result(
                "trust",
                "FAIL",
                f"the system trust store does not verify the mirror's certificate for "
                f"{self.name}: {exc.verify_message or exc}",
                "install the cluster root (ca/root.crt) into the node trust store and restart containerd "
                "(manifests/node-setup/node-setup.sh does both)",
            )
        except OSError as exc:
            return Result("trust", "skip" if not isinstance(self.v2, Reply) else "FAIL",
                          f"TLS to the mirror failed: {describe(exc)}")
        return Result(
            "trust", "ok", f"the system trust store verifies the mirror's certificate for {self.name}"
        )

    def check_cache(self) -> Result:
        directory = self.config.cache.dir
        if not directory.is_dir():
            return Result("cache", "FAIL", f"cache.dir {directory} does not exist",
                          "create it (the DaemonSet's hostPath does) or fix cache.dir")
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
                pass
        except OSError as exc:
            return Result("cache", "FAIL", f"cache.dir {directory} is not writable: {exc.strerror or exc}",
                          "give dnsmirror's user write access, or point cache.dir at a writable disk")
        free = shutil.disk_usage(directory).free
        used = _cached_bytes(directory)
        wanted = self.config.cache.max_size
        detail = f"cache.dir {directory} writable; {used / 2**30:.2f} GiB cached, {free / 2**30:.2f} GiB free"
        if free + used < wanted:
            return Result("cache", "warn", f"{detail}, less than cache.max_size "
                          f"({configmod.describe_size(wanted)})",
                          "lower cache.max_size below the disk's free space, or give the cache a larger disk")
        return Result("cache", "ok", detail)

    def check_containerd(self) -> Result:
        store = self.config.cache.containerd_content
        if store is None:
            return Result("containerd", "skip", "cache.containerd_content is not set")
        blobs = store / "blobs" / "sha256"
        if not blobs.is_dir():
            return Result("containerd", "FAIL", f"{blobs} does not exist",
                          "point cache.containerd_content at containerd's content store "
                          "(/var/lib/containerd/io.containerd.content.v1.content) and mount it read-only")
        if not os.access(blobs, os.R_OK | os.X_OK):
            return Result(
                "containerd",
                "FAIL",
                f"{blobs} is not readable",
                "run dnsmirror as root, or mount it readable",
            )
        return Result("containerd", "ok", f"containerd's content store {store} is readable")

    def check_peers(self) -> Result:
        from dnsmirror.peer_tls import PeerTLS
        from dnsmirror.peers import PeerSecretError, is_local_address, load_secret

        peers = self.config.peers
        if not peers.enabled:
            return Result("peers", "skip", "no peers.static or peers.dns_name")
        try:
            secret = load_secret(peers.secret_file)  # type: ignore[arg-type]  # set whenever peers are enabled
        except PeerSecretError as exc:
            return Result("peers", "FAIL", str(exc), "give peers.secret_file mode 0600 and 16+ bytes")
        members = list(peers.static)
        if peers.dns_name:
            found, problem = resolve_peers(peers.dns_name, peers.resolvers or self.config.dns.upstreams)
            if found is None:
                return Result("peers", "FAIL", f"peers.dns_name {peers.dns_name}: {problem}",
                              "set peers.resolvers to the cluster DNS "
                              "(kubectl -n kube-system get svc kube-dns)")
            members += [HostPort(address, peers.listen.port) for address in found]
        members = [member for member in dict.fromkeys(members) if not is_local_address(member.host)]
        if not members:
            return Result("peers", "warn", "no other node found yet",
                          "check peers.static, or that peers.dns_name names the other nodes")
        tls = PeerTLS(secret).client_creator.context if peers.tls else None
        answers = {member: probe_peer(member, secret, tls) for member in members[:MAX_PEERS_PROBED]}
        mode = "TLS" if tls is not None else "plain HTTP"
        wrong = {member: why for member, (kind, why) in answers.items() if kind == "mismatch"}
        unreachable = {member: why for member, (kind, why) in answers.items() if kind == "unreachable"}
        asked = f"{len(answers)} of {len(members)} peer(s) asked over {mode}"
        if wrong:
            shown = "; ".join(f"{member}: {why}" for member, why in list(wrong.items())[:3])
            return Result("peers", "FAIL", f"{asked}; {len(wrong)} cannot talk to this node: {shown}",
                          "every node needs the same peers.secret_file content and the same peers.tls")
        if unreachable:
            shown = "; ".join(f"{member}: {why}" for member, why in list(unreachable.items())[:3])
            return Result("peers", "warn", f"{asked}; {len(unreachable)} not reachable: {shown}",
                          f"allow TCP {peers.listen.port} between nodes, and check dnsmirror runs there")
        return Result("peers", "ok", f"{asked}; every one answered a signed request")

    def check_image(self) -> Result:
        assert self.image is not None  # run() checks an image only when one was given
        host, repository, reference = self.image
        path = f"/v2/{repository}/manifests/{reference}"
        headers = {"Accept": MANIFEST_ACCEPT}
        try:
            reply = https_get(
                self.mirror, self.port, host, path, verify=False, headers=headers
            )
            if reply.status == 401:
                token = anonymous_token(reply.headers.get("www-authenticate", ""), self._fetch_via_mirror)
                if token:
                    reply = https_get(self.mirror, self.port, host, path, verify=False,
                                      headers={**headers, "Authorization": f"Bearer {token}"})
        except OSError as exc:
            return Result("image", "FAIL", f"{host}/{repository}:{reference}: {describe(exc)}",
                          "see the checks above")
        if reply.status != 200:
            reason = error_message(reply.body) or f"status {reply.status}"
            return Result(
                "image",
                "FAIL",
                f"the manifest of {host}/{repository}:{reference} came back {reply.status}: {reason}",
                "check the image name; private images need the pull secret's credentials, "
                "which doctor does not have",
            )
        digest = reply.headers.get("docker-content-digest", "")
        return Result(
            "image",
            "ok",
            f"the manifest of {host}/{repository}:{reference} came through the mirror "
            f"({len(reply.body)} bytes{', ' + digest if digest else ''})",
        )

    def _fetch_via_mirror(self, url: str) -> Reply:
        """GET ``url``: through the mirror when its host is captured, else straight to the host."""
        parts = urllib.parse.urlsplit(url)
        target = f"{parts.path}?{parts.query}" if parts.query else parts.path
        host = parts.hostname or ""
        if self.matcher.captures(host):
            return https_get(self.mirror, self.port, host, target, verify=False)
        return https_get(host, parts.port or 443, host, target, verify=True)

    def _dns_addresses(self) -> set[str]:
        return {address.host for address in self.config.dns.listen}

    def _metrics_address(self) -> str:
        listen = self.config.metrics.listen
        return str(listen) if listen is not None else "<metrics.listen>"


# --- small pure helpers and I/O -------------------------------------------------------------------------


def parse_reference(image: str) -> tuple[str, str, str]:
    """(registry host, repository, tag or digest) of ``host/repo[:tag|@digest]``; docker.io's short forms."""
    first, _, rest = image.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        first, rest = "docker.io", image if "/" in image else f"library/{image}"
    if "@" in rest:
        repository, reference = rest.split("@", 1)
    else:
        repository, _, reference = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
    host = "registry-1.docker.io" if first == "docker.io" else first
    return host.lower(), repository, reference or "latest"


def example_name(capture: tuple[str, ...], matcher: HostMatcher) -> str:
    """A concrete captured name: the first pattern without a wildcard (else one filled in)."""
    for pattern in capture:
        if "*" not in pattern and matcher.captures(pattern):
            return pattern
    filled = capture[0].replace("*", "doctor")
    return filled


def query_addresses(
    server: str, port: int, name: str, qtype: str = "A", timeout: float = TIMEOUT
) -> list[str]:
    """The addresses (``qtype`` A or AAAA records) ``server`` answers for ``name`` (one UDP query)."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(DNSRecord.question(name, qtype).pack(), (server, port))
        reply = DNSRecord.parse(sock.recvfrom(4096)[0])
    wanted = getattr(QTYPE, qtype)
    return [str(ipaddress.ip_address(str(record.rdata))) for record in reply.rr if record.rtype == wanted]


def https_get(address: str, port: int, name: str, path: str, *, verify: bool,
              headers: dict[str, str] | None = None, limit: int = 4 * 1024 * 1024) -> Reply:
    """GET ``path`` from ``address:port`` with TLS server name and Host ``name``."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((address, port), timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        lines = [f"GET {path} HTTP/1.1", f"Host: {name}", "User-Agent: dnsmirror-doctor", "Connection: close"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        response = http.client.HTTPResponse(tls)
        response.begin()
        body = response.read(limit)
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)


def resolve_peers(name: str, resolvers: tuple[HostPort, ...],
                  timeout: float = TIMEOUT) -> tuple[list[str] | None, str]:
    """The A and AAAA addresses of ``name`` from the first of ``resolvers`` that answers (as the node's
    peer discovery goes on to the next resolver); (None, what went wrong) when none does."""
    problem = "no resolver: set peers.resolvers or dns.upstreams"
    for resolver in resolvers:
        try:
            return sorted({address for qtype in ("A", "AAAA")
                           for address in query_addresses(resolver.host, resolver.port, name, qtype,
                                                          timeout)}), ""
        except (OSError, ValueError) as exc:
            problem = f"{resolver}: {describe(exc)}"
    return None, problem


def probe_peer(peer: HostPort, secret: bytes, tls: SSL.Context | None) -> tuple[str, str]:
    """A signed ``HEAD`` of :data:`PROBE_DIGEST` at ``peer``'s listener, as a node asks its peers (inside
    TLS with ``tls``, the peers' client context). (``ok`` | ``mismatch`` | ``unreachable``, what happened)."""
    from OpenSSL import SSL

    from dnsmirror.peers import AUTH_HEADER, BLOB_PATH, sign

    request = "\r\n".join([
        f"HEAD {BLOB_PATH}{PROBE_DIGEST} HTTP/1.1", f"Host: {peer}", "User-Agent: dnsmirror-doctor",
        f"{AUTH_HEADER.decode()}: {sign(secret, 'HEAD', PROBE_DIGEST, time.time()).decode()}",
        "Connection: close", "", ""]).encode("latin-1")
    try:
        raw = socket.create_connection((peer.host, peer.port), timeout=TIMEOUT)
    except OSError as exc:
        return "unreachable", describe(exc)
    with raw:
        try:
            if tls is None:
                raw.sendall(request)
                answer = raw.recv(4096)
            else:
                connection = SSL.Connection(tls, raw)
                connection.set_connect_state()
                deadline = time.monotonic() + TIMEOUT
                try:
                    _tls_step(connection.do_handshake, raw, deadline)
                except SSL.Error as exc:
                    return "mismatch", f"TLS handshake failed ({describe(exc)}): another peers.tls or secret"
                except TimeoutError:
                    # a plain listener takes a TLS hello for the start of a request line and waits for more
                    return "mismatch", (f"no answer to a TLS handshake within {TIMEOUT:g}s: it may run "
                                        "without peers.tls")
                _tls_step(lambda: connection.sendall(request), raw, deadline)
                answer = _tls_step(lambda: connection.recv(4096), raw, deadline)
        except (OSError, SSL.Error) as exc:
            answer = f"{describe(exc)}".encode()
    status = answer.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    if status.startswith("HTTP/1.1 401"):
        return "mismatch", "refused the signature (401): another peers.secret_file"
    if status.startswith(("HTTP/1.1 404", "HTTP/1.1 200", "HTTP/1.1 503")):
        return "ok", status
    if tls is None:
        return "mismatch", "no HTTP answer: it may run with peers.tls"
    return "mismatch", f"unexpected answer {status[:80]!r}"


def _tls_step(step: Callable[[], Any], raw: socket.socket, deadline: float) -> Any:
    """``step`` of a pyOpenSSL connection over ``raw``, whose timeout makes it non-blocking: waits for the
    socket while OpenSSL wants to read or write, until ``deadline`` (then ``TimeoutError``)."""
    from OpenSSL import SSL

    while True:
        try:
            return step()
        except (SSL.WantReadError, SSL.WantWriteError) as want:
            left = deadline - time.monotonic()
            reading = isinstance(want, SSL.WantReadError)
            ready = select.select([raw] if reading else [], [] if reading else [raw], [], max(left, 0))
            if left <= 0 or not any(ready):
                raise TimeoutError("no TLS answer in time") from None


def anonymous_token(challenge: str, fetch: Callable[[str], Reply]) -> str | None:
    """An anonymous pull token for a ``Bearer realm=...,service=...,scope=...`` challenge, if one is given."""
    if not challenge.lower().startswith("bearer "):
        return None
    params = dict(part.split("=", 1) for part in challenge[7:].split(",") if "=" in part)
    params = {key.strip(): value.strip().strip('"') for key, value in params.items()}
    realm = params.pop("realm", "")
    if not realm.startswith("https://"):
        return None
    reply = fetch(f"{realm}?{urllib.parse.urlencode(params)}")
    if reply.status != 200:
        return None
    try:
        document = json.loads(reply.body)
    except ValueError:
        return None
    return document.get("token") or document.get("access_token")


def error_message(body: bytes) -> str:
    """The first message of an OCI error body, if it is one."""
    try:
        errors = json.loads(body).get("errors") or []
        return str(errors[0].get("message", ""))[:300]
    except (ValueError, AttributeError, IndexError):
        return ""


def describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer within {TIMEOUT:g}s"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _cached_bytes(directory: Path) -> int:
    """Bytes of the files under ``directory/blobs`` (the cache's committed content)."""
    total = 0
    for root, _dirs, files in os.walk(directory / "blobs"):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue  # evicted meanwhile
    return total


# --- the command ----------------------------------------------------------------------------------------


def _cmd_doctor(args: argparse.Namespace) -> int:
    try:
        config = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"FAIL config     {args.config or 'embedded default'}: {exc.describe()}", file=sys.stdout)
        return 1
    checks = Doctor(config, args.image, Path(args.resolv_conf))
    print(f"dnsmirror doctor: config {config.source}, mirror {checks.mirror}")
    failed = False
    for result in checks.run():
        for line in result.lines():
            print(line, flush=True)
        failed = failed or result.status == "FAIL"
    print("some checks failed" if failed else "all checks passed")
    return 1 if failed else 0


def register(commands) -> None:
    """Add ``doctor`` to the subcommands."""
    doctor = commands.add_parser("doctor", help="check this node's dnsmirror set-up and say how to fix it",
                                 description=__doc__.split("\n\n")[0].replace("``", ""))
    doctor.add_argument("--config", metavar="FILE", help="the config dnsmirror serves with (default: the "
                                                         "embedded default config)")
    doctor.add_argument("--resolv-conf", default="/etc/resolv.conf", metavar="FILE",
                        help="the node resolver's configuration (default: %(default)s)")
    doctor.add_argument("image", nargs="?", metavar="IMAGE",
                        help="also pull this image's manifest through the mirror (e.g. ghcr.io/org/app:1.0)")
    doctor.set_defaults(run=_cmd_doctor)
