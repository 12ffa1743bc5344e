"""Routing decisions of the registry front, with in-memory requests."""

from __future__ import annotations

import pytest
from fakes import FakeRequest

from dnsmirror import oci
from dnsmirror.authz import ANONYMOUS
from dnsmirror.patterns import HostMatcher
from dnsmirror.web import RegistryResource, request_host, server_name

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
DIGEST = "sha256:" + "ab" * 32


def web_request(
    uri: bytes, sni: str | None, hosts: list[bytes] | None, method=b"GET", authorization=None
) -> FakeRequest:
    """A request for ``uri`` on a TLS connection named ``sni``, with these Host headers."""
    headers: dict[bytes, bytes | list[bytes]] = {}
    if hosts is not None:
        headers[b"host"] = hosts
    if authorization:
        headers[b"authorization"] = authorization
    return FakeRequest(headers, uri=uri, method=method, sni=sni)


@pytest.fixture
def front():
    return RegistryResource(
        HostMatcher(["*.dkr.ecr.*.amazonaws.com", "docker.io"]), content=None, passthrough=None
    )


def test_a_digest_read_is_resolved_to_its_upstream_target(front):
    target = front.target_of(
        web_request(f"/v2/team/app/blobs/{DIGEST}".encode(), ECR, [f"{ECR}:443".encode()])
    )
    assert not isinstance(target, oci.OCIError)
    assert target.upstream_host == ECR and target.url == f"https://{ECR}/v2/team/app/blobs/{DIGEST}"
    assert target.path.by_digest and target.repository == "team/app" and target.digest == DIGEST
    assert target.credential == ANONYMOUS and target.auth_headers() == {}


def test_docker_io_goes_to_its_registry_host_and_credentials_are_hashed(front):
    target = front.target_of(
        web_request(
            b"/v2/library/alpine/manifests/3",
            "docker.io",
            [b"DOCKER.IO"],
            authorization=b"Bearer secret-token",
        )
    )
    assert target.upstream_host == "registry-1.docker.io"
    assert target.credential.startswith("sha256:") and "secret" not in target.credential
    assert target.auth_headers() == {b"authorization": [b"Bearer secret-token"]}
    assert target.path.tag == "3" and not target.path.by_digest


@pytest.mark.parametrize(
    ("sni", "hosts", "uri", "status"),
    [
        (ECR, [b"other.dkr.ecr.us-east-1.amazonaws.com"], b"/v2/", 421),  # Host is not the TLS name
        (None, [ECR.encode()], b"/v2/", 421),  # no SNI at all
        (ECR, None, b"/v2/", 400),  # no Host
        (ECR, [ECR.encode(), ECR.encode()], b"/v2/", 400),  # two Host headers
        ("example.com", [b"example.com"], b"/v2/", 421),  # not captured
        (ECR, [ECR.encode()], b"/v2/team/../etc/blobs/" + DIGEST.encode(), 400),
        (ECR, [ECR.encode()], b"/v2/team/app/blobs/sha256:xyz", 400),
        (ECR, [ECR.encode()], b"/v2/Team/app/manifests/v1", 400),
        (ECR, [ECR.encode()], "/v2/caf\u00e9".encode(), 400),
        (ECR, [ECR.encode()], b"/v2/" + b"a" * 9000, 414),
    ],
)
def test_requests_that_are_refused(front, sni, hosts, uri, status):
    error = front.target_of(web_request(uri, sni, hosts))
    assert isinstance(error, oci.OCIError) and error.status == status
    assert error.body().startswith(b'{"errors":[{"code":')


def test_helpers_tolerate_odd_input():
    assert request_host(web_request(b"/", None, [b"[::1]:443"])) is None
    assert request_host(web_request(b"/", None, [b"Quay.IO."])) == "quay.io"
    assert server_name(type("R", (), {"channel": None})()) is None
