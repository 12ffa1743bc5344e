"""End-to-end test harness: real registries, containerd and skopeo in network namespaces.

Modules, one concern each:

- :mod:`harness.netns`: namespaces on a private subnet (:class:`~harness.netns.Cluster`), processes in them
- :mod:`harness.pki`: a test "public" CA issuing server certificates
- :mod:`harness.registry`: Debian's docker-registry with TLS, optional htpasswd auth, a readable access log
- :mod:`harness.images`: multi-arch OCI images built with the standard library; pushes with skopeo
- :mod:`harness.containerd`: containerd 1.6 with no registry config; ``ctr images pull``
- :mod:`harness.cri`: a minimal CRI ImageService client (the kubelet's pull path)
- :mod:`harness.runtimes`: dockerd, podman and buildah with private directories and no registry config

Tests import it as ``harness`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from .netns import netns_available

ECR_HOST = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
"""The registry name the end-to-end tests use: the name containerd asks for."""

ECR_HOST_2 = "210987654321.dkr.ecr.eu-west-1.amazonaws.com"
"""A second captured-looking registry name, e.g. for a private registry beside the public one."""


def require_netns() -> None:
    """``pytest.skip`` with the reason when network namespaces cannot be used (not root, no ``ip netns``)."""
    reason = netns_available()
    if reason is not None:
        import pytest

        pytest.skip(reason)
