import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnsmirror.config import default_document
from dnsmirror.patterns import HostMatcher, Pattern, PatternError, is_valid_host, normalize_host

DEFAULTS = default_document()["capture"]


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("*.dkr.ecr.*.amazonaws.com", "123456789012.dkr.ecr.us-east-1.amazonaws.com", True),
        ("*.dkr.ecr.*.amazonaws.com", "123456789012.DKR.ECR.us-east-1.amazonaws.com.", True),
        ("*.dkr.ecr.*.amazonaws.com", "dkr.ecr.us-east-1.amazonaws.com", False),
        ("*.dkr.ecr.*.amazonaws.com", "1.dkr.ecr.amazonaws.com", False),
        ("*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.us-east-1.amazonaws.com.cn", False),
        ("*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.us-east-1.amazonaws.com.evil.io", False),
        ("*.dkr.ecr.*.amazonaws.com", "s3.amazonaws.com", False),
        ("*.gcr.io", "us.gcr.io", True),
        ("*.gcr.io", "a.b.gcr.io", True),
        ("*.gcr.io", "gcr.io", False),
        ("*.gcr.io", "notgcr.io", False),
        ("*-docker.pkg.dev", "europe-west1-docker.pkg.dev", True),
        ("*-docker.pkg.dev", "us-docker.pkg.dev", True),
        ("*-docker.pkg.dev", "docker.pkg.dev", False),
        ("*-docker.pkg.dev", "-docker.pkg.dev", False),
        ("*-docker.pkg.dev", "a.us-docker.pkg.dev", False),
        ("*-docker.pkg.dev", "us-docker.pkg.dev.evil.com", False),
        ("docker.io", "DOCKER.IO.", True),
        ("docker.io", "index.docker.io", False),
        ("*.azurecr.io", "team-a.azurecr.io", True),
        ("*.azurecr.io", "azurecr.io", False),
    ],
)
def test_capture_matching(pattern, host, expected):
    assert HostMatcher([pattern]).captures(host) is expected


def test_skip_always_wins():
    matcher = HostMatcher(["*.azurecr.io"], skip=["platform.azurecr.io"])
    assert matcher.captures("team.azurecr.io")
    assert not matcher.captures("platform.azurecr.io")
    assert not matcher.captures("PLATFORM.azurecr.io.")


def test_default_capture_list_covers_the_common_families():
    matcher = HostMatcher(DEFAULTS)
    for host in [
        "123456789012.dkr.ecr.us-east-1.amazonaws.com",
        "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
        "public.ecr.aws", "docker.io", "registry-1.docker.io", "ghcr.io", "quay.io", "gcr.io",
        "eu.gcr.io", "us-central1-docker.pkg.dev", "myteam.azurecr.io", "registry.k8s.io",
        "mcr.microsoft.com", "nvcr.io",
    ]:
        assert matcher.captures(host), host
    for host in ["example.com", "s3.amazonaws.com", "auth.docker.io", "production.cloudflare.docker.com",
                 "storage.googleapis.com", "pkg-containers.githubusercontent.com"]:
        assert not matcher.captures(host), host


@pytest.mark.parametrize(
    "bad", ["*", "*.io", "io", "", "a..b.com", "*.*", "ex ample.com", "a.b*", "**.a.com", "*.com"]
)
def test_bad_patterns_are_rejected_with_a_reason(bad):
    with pytest.raises(PatternError) as info:
        Pattern.parse(bad)
    assert str(info.value)


@pytest.mark.parametrize(
    ("pattern", "suffix"),
    [
        ("*.dkr.ecr.*.amazonaws.com", "amazonaws.com"),
        ("*-docker.pkg.dev", "pkg.dev"),
        ("docker.io", "docker.io"),
        ("*.azurecr.io", "azurecr.io"),
        ("*.dkr.ecr.*.amazonaws.com.cn", "amazonaws.com.cn"),
    ],
)
def test_literal_suffix(pattern, suffix):
    assert Pattern.parse(pattern).literal_suffix == suffix


def test_invalid_host_names_are_never_captured():
    matcher = HostMatcher(["*.azurecr.io"])
    assert not matcher.captures("bad-.azurecr.io")
    assert not matcher.captures("a b.azurecr.io")
    assert not matcher.captures("x" * 64 + ".azurecr.io")


@given(st.text(max_size=300))
def test_matching_never_raises(host):
    matcher = HostMatcher(DEFAULTS, skip=["nvcr.io"])
    result = matcher.captures(host)
    assert isinstance(result, bool)
    if result:
        assert is_valid_host(normalize_host(host))


@given(
    st.lists(
        st.sampled_from(
            [
                "a",
                "us-east-1",
                "dkr",
                "ecr",
                "amazonaws",
                "com",
                "io",
                "docker",
                "pkg",
                "dev",
                "x-docker",
                "gcr",
                "azurecr",
                "cn",
            ]
        ),
        min_size=1,
        max_size=7,
    )
)
def test_a_pattern_only_matches_inside_its_literal_suffix(labels):
    host = ".".join(labels)
    for pattern in DEFAULTS:
        parsed = Pattern.parse(pattern)
        if parsed.matches(host):
            suffix = parsed.literal_suffix
            assert host == suffix or host.endswith("." + suffix)
