"""What one client request addresses upstream: host, path, repository, digest, credentials."""

from __future__ import annotations

from dataclasses import dataclass

from dnsmirror.oci import DistributionPath, Endpoint


@dataclass(frozen=True)
class Target:
    """A request, resolved against the captured host it was sent to (SNI = Host)."""

    # the name the client connected to (SNI), e.g. 1234.dkr.ecr.us-east-1.amazonaws.com
    host: str
    upstream_host: str        # where it goes upstream (docker.io -> registry-1.docker.io)
    uri: bytes                # path and query, as received
    method: str
    path: DistributionPath | None
    credential: str           # credential_key() of the Authorization header
    authorization: list[bytes]  # the raw Authorization header values (never logged or stored)

    @property
    def url(self) -> str:
        return f"https://{self.upstream_host}{self.uri.decode('ascii')}"

    @property
    def repository(self) -> str:
        return self.path.name if self.path is not None and self.path.name else ""

    @property
    def digest(self) -> str:
        return str(self.path.digest) if self.path is not None and self.path.digest is not None else ""

    @property
    def tag(self) -> str | None:
        """The tag a manifest request names (None when it names a digest, or is not a manifest's)."""
        return self.path.tag if self.path is not None else None

    @property
    def is_manifest(self) -> bool:
        return self.path is not None and self.path.endpoint is Endpoint.MANIFEST

    def auth_headers(self) -> dict[bytes, list[bytes]]:
        """Only the client's credentials, for requests dnsmirror makes on the client's behalf."""
        return {b"authorization": list(self.authorization)} if self.authorization else {}
