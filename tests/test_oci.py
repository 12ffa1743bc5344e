import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnsmirror import oci
from dnsmirror.oci import (
    Digest,
    Endpoint,
    OCIError,
    RangeNotSatisfiable,
    parse_digest,
    parse_path,
    parse_range,
)

HEX = "a" * 64
SHA = f"sha256:{HEX}"


# --- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "endpoint", "name", "reference"),
    [
        ("/v2/", Endpoint.BASE, None, None),
        ("/v2", Endpoint.BASE, None, None),
        ("/v2/_catalog", Endpoint.CATALOG, None, None),
        ("/v2/_catalog?n=10", Endpoint.CATALOG, None, None),
        (f"/v2/library/alpine/blobs/{SHA}", Endpoint.BLOB, "library/alpine", SHA),
        (f"/v2/team/app/manifests/{SHA}", Endpoint.MANIFEST, "team/app", SHA),
        ("/v2/team/app/manifests/v1.2.3", Endpoint.MANIFEST, "team/app", "v1.2.3"),
        ("/v2/team/app/manifests/latest?ns=docker.io", Endpoint.MANIFEST, "team/app", "latest"),
        ("/v2/app/tags/list", Endpoint.TAGS, "app", None),
        ("/v2/app/tags/list?n=5&last=b", Endpoint.TAGS, "app", None),
        (f"/v2/app/referrers/{SHA}", Endpoint.REFERRERS, "app", SHA),
        ("/v2/app/blobs/uploads/", Endpoint.UPLOAD, "app", None),
        ("/v2/app/blobs/uploads", Endpoint.UPLOAD, "app", None),
        ("/v2/a/b/blobs/uploads/1f2e-3d4c?_state=x%2Fy", Endpoint.UPLOAD, "a/b", "1f2e-3d4c"),
        # a repository may itself have components named like endpoints: the tail decides
        (f"/v2/blobs/manifests/blobs/{SHA}", Endpoint.BLOB, "blobs/manifests", SHA),
        (f"/v2/x/blobs/uploads/blobs/{SHA}", Endpoint.BLOB, "x/blobs/uploads", SHA),
        ("/v2/x/manifests/manifests/manifests", Endpoint.MANIFEST, "x/manifests", "manifests"),
        ("/token", Endpoint.OTHER, None, None),
        ("/v2/token", Endpoint.OTHER, None, None),
        ("/oauth2/token?service=x%20y", Endpoint.OTHER, None, None),
        ("/", Endpoint.OTHER, None, None),
    ],
)
def test_parse_path_endpoints(path, endpoint, name, reference):
    parsed = parse_path(path)
    assert (parsed.endpoint, parsed.name, parsed.reference) == (endpoint, name, reference)
    assert parsed.path == path.split("?")[0]


def test_parse_path_fields():
    blob = parse_path(f"/v2/a/blobs/{SHA}".encode())
    assert blob.digest == Digest("sha256", HEX) and blob.tag is None and blob.by_digest
    tag = parse_path("/v2/a/manifests/latest")
    assert tag.tag == "latest" and tag.digest is None and not tag.by_digest
    manifest = parse_path(f"/v2/a/manifests/{SHA}")
    assert manifest.by_digest
    upload = parse_path("/v2/a/blobs/uploads/abc")
    assert upload.upload_session == "abc" and not upload.by_digest
    referrers = parse_path(f"/v2/a/referrers/{SHA}")
    assert referrers.digest == Digest("sha256", HEX) and not referrers.by_digest


def test_sha512_blob_parses_but_is_not_served_by_digest():
    parsed = parse_path("/v2/a/blobs/sha512:" + "b" * 128)
    assert parsed.endpoint is Endpoint.BLOB
    assert parsed.digest.algorithm == "sha512" and not parsed.digest.supported
    assert not parsed.by_digest
    with pytest.raises(OCIError) as caught:
        oci.require_supported(parsed.digest)
    assert caught.value.code == "UNSUPPORTED" and caught.value.status == 400


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/Library/alpine/blobs/" + SHA, "NAME_INVALID"),
        ("/v2/a//b/blobs/" + SHA, "NAME_INVALID"),
        ("/v2/-a/manifests/latest", "NAME_INVALID"),
        ("/v2/a__-b/manifests/latest", "NAME_INVALID"),
        ("/v2/a___b/manifests/latest", "NAME_INVALID"),
        ("/v2/" + "a" * 256 + "/manifests/latest", "NAME_INVALID"),
        ("/v2/a/blobs/sha256:" + "A" * 64, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:" + "a" * 63, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:" + "g" * 64, "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:" + "a" * 32, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha512:" + "a" * 64, "DIGEST_INVALID"),
        ("/v2/a/blobs/latest", "DIGEST_INVALID"),
        ("/v2/a/blobs/", "DIGEST_INVALID"),
        ("/v2/a/manifests/sha256:abc", "DIGEST_INVALID"),
        ("/v2/a/manifests/-latest", "TAG_INVALID"),
        ("/v2/a/manifests/" + "t" * 129, "TAG_INVALID"),
        ("/v2/a/manifests/", "TAG_INVALID"),
        ("/v2/a/referrers/nope", "DIGEST_INVALID"),
    ],
)
def test_parse_path_rejects_bad_components(path, code):
    with pytest.raises(OCIError) as caught:
        parse_path(path)
    assert caught.value.code == code
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "path",
    [
        "/v2/../etc/passwd",
        "/v2/a/../b/blobs/" + SHA,
        "/v2/./a/manifests/latest",
        "/v2/a%2fb/manifests/latest",
        "/v2/a%2Fb/manifests/latest",
        "/v2/%2e%2e/manifests/latest",
        "/v2/a/manifests/lat%00est",
        "/v2/a\x00/manifests/latest",
        "/v2/a\\b/manifests/latest",
        "/v2/a b/manifests/latest",
        "/v2/caf\u00e9/manifests/latest",
        b"/v2/caf\xc3\xa9/manifests/latest",
        "v2/a/manifests/latest",
        "",
        "/v2/" + "a/" * 2000 + "manifests/latest",
        "/token/..",
    ],
)
def test_parse_path_rejects_odd_paths(path):
    with pytest.raises(OCIError) as caught:
        parse_path(path)
    assert caught.value.status == 400
    assert caught.value.message  # says why


def test_other_percent_escapes_in_tags_are_not_decoded():
    # "%41" would decode to "A": a valid tag only after decoding, which we never do
    with pytest.raises(OCIError) as caught:
        parse_path("/v2/a/manifests/%41")
    assert caught.value.code == "TAG_INVALID"


@given(st.text(max_size=300))
def test_random_text_paths_raise_only_oci_errors(path):
    try:
        parsed = parse_path(path)
    except OCIError:
        return
    assert parsed.path == path.split("?")[0]


@given(st.binary(max_size=300))
def test_random_byte_paths_raise_only_oci_errors(path):
    try:
        parse_path(path)
    except OCIError:
        pass


_ALPHABET = st.sampled_from(
    [
        "/",
        "v2",
        "blobs",
        "manifests",
        "uploads",
        "tags",
        "list",
        "referrers",
        "a",
        "B",
        ".",
        "..",
        "-",
        "_",
        "__",
        ":",
        "sha256",
        "sha512",
        HEX,
        "%2f",
        "%2e",
        "%",
        "?",
        "\x00",
        "é",
    ]
)


@given(st.lists(_ALPHABET, max_size=20).map(lambda parts: "/v2/" + "".join(parts)))
def test_structured_random_paths_raise_only_oci_errors(path):
    try:
        parsed = parse_path(path)
    except OCIError:
        return
    # whatever parses never carries a dot segment, and names always satisfy the grammar
    assert ".." not in parsed.path.split("/")
    if parsed.name is not None:
        assert oci.validate_name(parsed.name) == parsed.name
    if parsed.by_digest:
        assert len(parsed.digest.encoded) == 64


# --- names, tags, digests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "library/alpine", "a.b_c__d---e/f", "123456789012/team-a/app", "a" * 255, "x/" * 127 + "y"],
)
def test_valid_names(name):
    assert oci.validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "A", "a/", "/a", "a_", "a..b", "a._b", "a___b", "a" * 256, "a\nb", "a\n"]
)
def test_invalid_names(name):
    with pytest.raises(OCIError) as caught:
        oci.validate_name(name)
    assert caught.value.code == "NAME_INVALID"


@pytest.mark.parametrize("tag", ["latest", "_x", "V1.0-rc_1", "a" * 128, "1"])
def test_valid_tags(tag):
    assert oci.validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a:b", "a/b", "latest\n"])
def test_invalid_tags(tag):
    with pytest.raises(OCIError) as caught:
        oci.validate_tag(tag)
    assert caught.value.code == "TAG_INVALID"


def test_digest_parse_and_str():
    digest = parse_digest(SHA)
    assert str(digest) == SHA and digest.supported
    assert Digest.of(b"hello") == parse_digest("sha256:" + hashlib.sha256(b"hello").hexdigest())


@given(st.text(max_size=200))
def test_random_digests_raise_only_oci_errors(text):
    try:
        digest = parse_digest(text)
    except OCIError as error:
        assert error.code == "DIGEST_INVALID"
        return
    assert str(digest) == text
    assert digest.algorithm in ("sha256", "sha512")


@given(st.binary(min_size=0, max_size=64))
def test_digest_of_round_trips(data):
    digest = Digest.of(data)
    assert parse_digest(str(digest)) == digest


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("BLOB_UNKNOWN", 404),
        ("MANIFEST_UNKNOWN", 404),
        ("DIGEST_INVALID", 400),
        ("NAME_INVALID", 400),
        ("NAME_UNKNOWN", 404),
        ("UNAUTHORIZED", 401),
        ("DENIED", 403),
        ("UNSUPPORTED", 405),
        ("TOOMANYREQUESTS", 429),
        ("MANIFEST_INVALID", 400),
        ("SIZE_INVALID", 400),
        ("RANGE_INVALID", 416),
        ("UNAVAILABLE", 503),
    ],
)
def test_error_statuses_and_body(code, status):
    error = OCIError(code, detail={"digest": SHA})
    assert error.status == status
    body = json.loads(error.body())
    assert body == {"errors": [{"code": code, "message": error.message, "detail": {"digest": SHA}}]}
    assert error.message


def test_error_body_without_detail_and_status_override():
    error = OCIError("UNSUPPORTED", "nope", status=400)
    assert error.status == 400
    assert json.loads(error.body()) == {"errors": [{"code": "UNSUPPORTED", "message": "nope"}]}
    assert json.loads(oci.error_body([("A", "a", None), ("B", "b", 1)]))["errors"][1] == {
        "code": "B", "message": "b", "detail": 1}


# --- manifests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"[]", b"\xff\xfe", b"{", b"null", b"[" * 100000])
def test_manifest_parsing_rejects_non_objects(body):
    with pytest.raises(OCIError) as caught:
        oci.manifest_media_type(body)
    assert caught.value.code == "MANIFEST_INVALID"


def test_manifest_size_limit():
    assert oci.MANIFEST_MAX_SIZE == 4 * 1024 * 1024
    padded = b'{"layers":[],"pad":"' + b"x" * oci.MANIFEST_MAX_SIZE + b'"}'
    with pytest.raises(OCIError):
        oci.manifest_media_type(padded)


@given(st.binary(max_size=500))
def test_manifest_parsing_raises_only_oci_errors(body):
    try:
        oci.manifest_media_type(body)
    except OCIError:
        pass


def test_manifest_media_type():
    assert oci.manifest_media_type(b'{"mediaType":"' + oci.OCI_INDEX.encode() + b'"}') == oci.OCI_INDEX
    assert (
        oci.manifest_media_type(b"{}", "application/vnd.oci.image.manifest.v1+json; charset=x")
        == oci.OCI_MANIFEST
    )
    assert oci.manifest_media_type(b"{}") is None
    assert oci.OCI_INDEX in oci.INDEX_TYPES and oci.DOCKER_MANIFEST in oci.IMAGE_MANIFEST_TYPES
    assert oci.MANIFEST_TYPES == oci.INDEX_TYPES | oci.IMAGE_MANIFEST_TYPES


# --- ranges --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "total", "expected"),
    [
        (None, 10, None),
        ("bytes=0-", 10, (0, 9)),
        ("bytes=4-", 10, (4, 9)),
        ("bytes=9-", 10, (9, 9)),
        ("bytes=2-5", 10, (2, 5)),
        ("bytes=2-500", 10, (2, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        (b"bytes=1-1", 10, (1, 1)),
        ("bytes=5-2", 10, None),
        ("bytes=0-1,4-5", 10, None),
        ("items=0-1", 10, None),
        ("bytes=", 10, None),
        ("bytes=-", 10, None),
        ("bytes=\u0661-", 10, None),  # a non-ASCII digit is not a digit here
    ],
)
def test_parse_range(header, total, expected):
    result = parse_range(header, total)
    if expected is None:
        assert result is None
    else:
        assert (result.start, result.end, result.total) == (*expected, total)
        assert result.length == expected[1] - expected[0] + 1
        assert result.content_range == f"bytes {expected[0]}-{expected[1]}/{total}"


@pytest.mark.parametrize(("header", "total"), [("bytes=10-", 10), ("bytes=99-100", 10), ("bytes=0-", 0),
                                               ("bytes=-0", 10), ("bytes=-5", 0),
                                               ("bytes=" + "9" * 40 + "-", 10)])
def test_unsatisfiable_range(header, total):
    with pytest.raises(RangeNotSatisfiable) as caught:
        parse_range(header, total)
    assert caught.value.status == 416
    assert caught.value.code == "RANGE_INVALID"
    assert caught.value.content_range == f"bytes */{total}"


@given(st.one_of(st.text(max_size=60), st.from_regex(r"bytes=[0-9]{0,4}-[0-9]{0,4}", fullmatch=True)),
       st.integers(min_value=0, max_value=5000))
def test_random_ranges_are_within_the_content(header, total):
    try:
        result = parse_range(header, total)
    except RangeNotSatisfiable:
        return
    if result is not None:
        assert 0 <= result.start <= result.end < total
        assert result.length >= 1


# --- hosts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sni", "host"),
    [
        ("docker.io", "registry-1.docker.io"),
        ("Docker.IO.", "registry-1.docker.io"),
        ("registry-1.docker.io", "registry-1.docker.io"),
        ("123456789012.dkr.ecr.us-east-1.amazonaws.com", "123456789012.dkr.ecr.us-east-1.amazonaws.com"),
        ("index.docker.io", "index.docker.io"),
    ],
)
def test_upstream_host(sni, host):
    assert oci.upstream_host(sni) == host
