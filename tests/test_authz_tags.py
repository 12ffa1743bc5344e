from dnsmirror.authz import ANONYMOUS, Grants, credential_key
from dnsmirror.tags import TagAnswer, TagMemory, accept_key, accepted_types

HOST, REPO, DIGEST = "1.dkr.ecr.x.amazonaws.com", "team/app", "sha256:" + "a" * 64


def test_credential_keys_hash_and_never_contain_the_secret():
    key = credential_key(b"Basic YWxpY2U6c2VjcmV0")
    assert key.startswith("sha256:") and "YWxpY2U6" not in key
    assert key == credential_key("Basic YWxpY2U6c2VjcmV0")
    assert key != credential_key(b"Basic Ym9iOnNlY3JldA==")
    assert credential_key(None) == credential_key(b"") == ANONYMOUS


def test_grants_are_per_credential_repository_and_digest_and_expire():
    grants = Grants(fresh_ttl=300, offline_ttl=3600)
    grants.grant("alice", HOST, REPO, [DIGEST], now=1000)
    assert grants.is_fresh("alice", HOST, REPO, DIGEST, now=1300)
    assert not grants.is_fresh("alice", HOST, REPO, DIGEST, now=1301)
    assert grants.allows_offline("alice", HOST, REPO, DIGEST, now=4600)
    assert not grants.allows_offline("alice", HOST, REPO, DIGEST, now=4601)
    for other in (("bob", HOST, REPO), ("alice", "other.azurecr.io", REPO), ("alice", HOST, "team/other")):
        assert not grants.is_fresh(*other, DIGEST, now=1000)
    grants.revoke("alice", HOST, REPO, DIGEST)
    assert not grants.allows_offline("alice", HOST, REPO, DIGEST, now=1000)


def test_offline_ttl_zero_never_serves_offline_and_grants_are_bounded():
    grants = Grants(fresh_ttl=300, offline_ttl=0, max_entries=3)
    grants.grant("alice", HOST, REPO, [DIGEST], now=1000)
    assert not grants.allows_offline("alice", HOST, REPO, DIGEST, now=1001)
    grants.grant("alice", HOST, REPO, [f"sha256:{i:064x}" for i in range(5)], now=1000)
    assert len(grants) == 3 and not grants.is_fresh("alice", HOST, REPO, DIGEST, now=1000)


def test_accept_sets_ignore_order_parameters_and_repetition():
    one = accepted_types([b"application/vnd.oci.image.index.v1+json", b"application/json; q=0.5, */*"])
    two = accepted_types([b"*/*", b"application/json", b"application/vnd.oci.image.index.v1+json"])
    assert one == two and accept_key(one) == accept_key(two)


def test_tag_memory_prefers_the_same_accept_set_then_an_acceptable_type():
    tags = TagMemory(max_tags=2)
    index = frozenset(
        {"application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json"}
    )
    single = frozenset({"application/vnd.docker.distribution.manifest.v2+json"})
    tags.remember(
        HOST, REPO, "v1", index, TagAnswer("sha256:1", "application/vnd.oci.image.index.v1+json", 10, 5)
    )
    tags.remember(
        HOST,
        REPO,
        "v1",
        single,
        TagAnswer("sha256:2", "application/vnd.docker.distribution.manifest.v2+json", 10, 1),
    )
    assert tags.recall(HOST, REPO, "v1", index).digest == "sha256:1"
    assert tags.recall(HOST, REPO, "v1", single).digest == "sha256:2"
    assert tags.recall(HOST, REPO, "v1", frozenset({"application/vnd.oci.image.manifest.v1+json"})) is None
    assert tags.recall(HOST, REPO, "v1", frozenset()).digest == "sha256:1"  # no Accept: the newest
    assert tags.recall(HOST, REPO, "v2", index) is None
    tags.remember(HOST, REPO, "a", index, TagAnswer("sha256:3", "x", 1, 1))
    tags.remember(HOST, REPO, "b", index, TagAnswer("sha256:4", "x", 1, 1))
    assert tags.recall(HOST, REPO, "v1", index) is None  # bounded: the oldest tag went
