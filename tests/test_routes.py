import ipaddress
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ocigate import routes as routes_module
from ocigate.routes import (
    MAX_REPOSITORY_LENGTH,
    Route,
    RouteError,
    RouteKind,
    format_route,
    named_reference,
    normalize_repository,
    normalize_upstream,
    parse_route,
)

SHA256 = "sha256:" + "a1" * 32
SHA512 = "sha512:" + "0f" * 64


def not_a_valid_route(path: str) -> bool:
    """True when the path is refused (RouteError) or passed over (None): never taken for a route."""
    try:
        return parse_route(path) is None
    except RouteError:
        return True


def route_error_code(path: str) -> str:
    with pytest.raises(RouteError) as caught:
        parse_route(path)
    return caught.value.code


# --- parse_route: one example per route kind -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/", Route(RouteKind.PING)),
        ("/v2", Route(RouteKind.PING)),
        ("/v2/_catalog", Route(RouteKind.CATALOG)),
        ("/v2/library/ubuntu/tags/list", Route(RouteKind.TAGS, "library/ubuntu")),
        ("/v2/library/ubuntu/manifests/22.04", Route(RouteKind.MANIFEST, "library/ubuntu", tag="22.04")),
        (
            f"/v2/library/ubuntu/manifests/{SHA256}",
            Route(RouteKind.MANIFEST, "library/ubuntu", digest=SHA256),
        ),
        (f"/v2/a/b/c/blobs/{SHA256}", Route(RouteKind.BLOB, "a/b/c", digest=SHA256)),
        ("/v2/team/app/blobs/uploads/", Route(RouteKind.BLOB_UPLOAD, "team/app")),
        ("/v2/team/app/blobs/uploads", Route(RouteKind.BLOB_UPLOAD, "team/app")),
        (
            "/v2/team/app/blobs/uploads/0b7c1d2e-aa_b.c=",
            Route(RouteKind.UPLOAD_SESSION, "team/app", upload_id="0b7c1d2e-aa_b.c="),
        ),
        (f"/v2/team/app/referrers/{SHA512}", Route(RouteKind.REFERRERS, "team/app", digest=SHA512)),
    ],
)
def test_parse_route_recognises_each_route_kind(path: str, expected: Route) -> None:
    assert parse_route(path) == expected


@pytest.mark.parametrize("path", ["/", "", "/token", "/v1/_ping", "/v2x", "/v2x/foo/manifests/latest", "/V2/", "v2/"])
def test_paths_outside_v2_are_not_routes(path: str) -> None:
    assert parse_route(path) is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/_catalog/", Route(RouteKind.CATALOG)),
        ("/v2/app/tags/list/", Route(RouteKind.TAGS, "app")),
        ("/v2/app/manifests/latest/", Route(RouteKind.MANIFEST, "app", tag="latest")),
    ],
)
def test_one_trailing_slash_is_tolerated(path: str, expected: Route) -> None:
    assert parse_route(path) == expected


@pytest.mark.parametrize("path", ["/v2/app/manifests/latest//", "/v2//app/manifests/latest", "/v2/a//b/tags/list"])
def test_empty_segments_make_no_valid_route(path: str) -> None:
    assert not_a_valid_route(path)


def test_repository_name_ends_at_the_last_route_keyword() -> None:
    assert parse_route("/v2/foo/manifests/bar/manifests/latest") == Route(
        RouteKind.MANIFEST, "foo/manifests/bar", tag="latest"
    )
    assert parse_route(f"/v2/x/blobs/uploads/blobs/{SHA256}") == Route(RouteKind.BLOB, "x/blobs/uploads", digest=SHA256)
    assert parse_route("/v2/x/tags/list/tags/list") == Route(RouteKind.TAGS, "x/tags/list")


def test_blob_upload_keyword_wins_over_a_blob_named_uploads() -> None:
    assert parse_route("/v2/a/blobs/uploads") == Route(RouteKind.BLOB_UPLOAD, "a")
    assert parse_route("/v2/a/blobs/uploads/list") == Route(RouteKind.UPLOAD_SESSION, "a", upload_id="list")


@pytest.mark.parametrize(
    "path", ["/v2/foo/bar", "/v2/foo", "/v2//", "/v2/foo/_catalog", "/v2/a/uploads/x", "/v2/token", "/v2/auth"]
)
def test_other_paths_under_v2_are_not_routes(path: str) -> None:
    assert parse_route(path) is None


@pytest.mark.parametrize(
    "path",
    [
        "/v2/Foo/bar/manifests/latest",
        "/v2/-foo/tags/list",
        "/v2/foo-/tags/list",
        "/v2/foo..bar/tags/list",
        "/v2/foo___bar/tags/list",
        "/v2/../tags/list",
        "/v2/tags/list",
        "/v2/manifests/latest",
        "/v2/caf%C3%A9/tags/list",
    ],
)
def test_invalid_repository_names_are_name_invalid(path: str) -> None:
    assert route_error_code(path) == "NAME_INVALID"


def test_repository_name_length_limit() -> None:
    longest = "/".join(["a" * 127, "b" * 127])
    assert len(longest) == MAX_REPOSITORY_LENGTH
    assert parse_route(f"/v2/{longest}/tags/list") == Route(RouteKind.TAGS, longest)
    assert route_error_code(f"/v2/{longest}c/tags/list") == "NAME_INVALID"


def test_name_error_message_names_the_repository() -> None:
    with pytest.raises(RouteError, match="repository name 'Foo/bar' is invalid"):
        parse_route("/v2/Foo/bar/tags/list")


@pytest.mark.parametrize("tag", ["latest", "_x", "V1.2.3-rc_1", "a" * 128])
def test_valid_tags(tag: str) -> None:
    assert parse_route(f"/v2/app/manifests/{tag}") == Route(RouteKind.MANIFEST, "app", tag=tag)


@pytest.mark.parametrize("tag", [".hidden", "-x", "a" * 129, "a+b", "t%20t", "a%2Fb"])
def test_invalid_tags_are_tag_invalid(tag: str) -> None:
    assert route_error_code(f"/v2/app/manifests/{tag}") == "TAG_INVALID"


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,
        "sha512:" + "B" * 128,
        "sha256:",
        ":abc",
        "SHA256:" + "a" * 64,
        "sha256:ab:cd",
        "sha256-:abc",
    ],
)
def test_invalid_digests_are_digest_invalid(digest: str) -> None:
    assert route_error_code(f"/v2/app/blobs/{digest}") == "DIGEST_INVALID"
    assert route_error_code(f"/v2/app/manifests/{digest}") == "DIGEST_INVALID"


@pytest.mark.parametrize("digest", [SHA256, SHA512, "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8"])
def test_valid_digests(digest: str) -> None:
    assert parse_route(f"/v2/app/blobs/{digest}") == Route(RouteKind.BLOB, "app", digest=digest)


def test_percent_encoded_colon_in_digest_is_decoded() -> None:
    encoded = SHA256.replace(":", "%3A")
    assert parse_route(f"/v2/app/manifests/{encoded}") == Route(RouteKind.MANIFEST, "app", digest=SHA256)
    assert parse_route(f"/v2/app/blobs/{encoded.replace('%3A', '%3a')}") == Route(RouteKind.BLOB, "app", digest=SHA256)


def test_percent_encoding_is_decoded_only_once() -> None:
    assert route_error_code("/v2/app/manifests/" + SHA256.replace(":", "%253A")) == "TAG_INVALID"


def test_encoded_slash_cannot_create_name_segments() -> None:
    with pytest.raises(RouteError) as caught:
        parse_route("/v2/library%2Fubuntu/tags/list")
    assert caught.value.code == "NAME_INVALID"
    assert "encoded '/'" in str(caught.value)


def test_encoded_slash_cannot_create_route_keywords() -> None:
    assert parse_route("/v2/app/blobs%2Fuploads/") is None


@pytest.mark.parametrize("path", ["/v2/app/manifests/%FF", "/v2/%C3/tags/list", "/v2/app/manifests/\ud800%80"])
def test_invalid_utf8_after_decoding_is_a_route_error(path: str) -> None:
    with pytest.raises(RouteError):
        parse_route(path)


@pytest.mark.parametrize("upload_id", [".", "..", "a/b", "a%2Fb", "a b"])
def test_invalid_upload_ids_are_rejected(upload_id: str) -> None:
    assert not_a_valid_route(f"/v2/app/blobs/uploads/{upload_id}")
    with pytest.raises(RouteError):
        Route(RouteKind.UPLOAD_SESSION, "app", upload_id=upload_id)


def test_dot_upload_ids_are_blob_upload_unknown() -> None:
    assert route_error_code("/v2/app/blobs/uploads/..") == "BLOB_UPLOAD_UNKNOWN"


# --- Route and format_route ----------------------------------------------------------------------------


def test_route_reference_is_the_tag_or_the_digest() -> None:
    assert Route(RouteKind.MANIFEST, "app", tag="v1").reference == "v1"
    assert Route(RouteKind.MANIFEST, "app", digest=SHA256).reference == SHA256
    assert Route(RouteKind.TAGS, "app").reference is None


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": RouteKind.PING, "repository": "app"},
        {"kind": RouteKind.TAGS},
        {"kind": RouteKind.MANIFEST, "repository": "app"},
        {"kind": RouteKind.MANIFEST, "repository": "app", "tag": "v1", "digest": SHA256},
        {"kind": RouteKind.BLOB, "repository": "app"},
        {"kind": RouteKind.BLOB, "repository": "app", "digest": SHA256, "tag": "v1"},
        {"kind": RouteKind.BLOB_UPLOAD, "repository": "app", "upload_id": "x"},
        {"kind": RouteKind.UPLOAD_SESSION, "repository": "app"},
        {"kind": RouteKind.TAGS, "repository": "../etc"},
    ],
)
def test_routes_with_wrong_fields_cannot_be_built(fields: dict[str, object]) -> None:
    with pytest.raises(RouteError):
        Route(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("route", "path"),
    [
        (Route(RouteKind.PING), "/v2/"),
        (Route(RouteKind.CATALOG), "/v2/_catalog"),
        (Route(RouteKind.TAGS, "a/b"), "/v2/a/b/tags/list"),
        (Route(RouteKind.MANIFEST, "a", tag="v1"), "/v2/a/manifests/v1"),
        (Route(RouteKind.MANIFEST, "a", digest=SHA256), f"/v2/a/manifests/{SHA256}"),
        (Route(RouteKind.BLOB, "a", digest=SHA256), f"/v2/a/blobs/{SHA256}"),
        (Route(RouteKind.BLOB_UPLOAD, "a"), "/v2/a/blobs/uploads/"),
        (Route(RouteKind.UPLOAD_SESSION, "a", upload_id="u-1"), "/v2/a/blobs/uploads/u-1"),
        (Route(RouteKind.REFERRERS, "a", digest=SHA256), f"/v2/a/referrers/{SHA256}"),
    ],
)
def test_format_route(route: Route, path: str) -> None:
    assert format_route(route) == path


# --- named_reference -----------------------------------------------------------------------------------


def test_named_reference_by_tag_digest_or_both() -> None:
    assert named_reference("docker.io", "library/ubuntu", tag="22.04") == "docker.io/library/ubuntu:22.04"
    assert named_reference("[::1]:5000", "app", digest=SHA256) == f"[::1]:5000/app@{SHA256}"
    assert named_reference("ghcr.io", "o/app", tag="v1", digest=SHA256) == f"ghcr.io/o/app:v1@{SHA256}"


def test_named_reference_needs_a_tag_or_digest() -> None:
    with pytest.raises(ValueError, match="tag"):
        named_reference("docker.io", "library/ubuntu")


@pytest.mark.parametrize(
    ("repository", "tag", "digest", "code"),
    [
        ("Ubuntu", "v1", None, "NAME_INVALID"),
        ("ubuntu", "-v1", None, "TAG_INVALID"),
        ("ubuntu", None, "sha256:abc", "DIGEST_INVALID"),
    ],
)
def test_named_reference_validates_its_parts(repository: str, tag: str | None, digest: str | None, code: str) -> None:
    with pytest.raises(RouteError) as caught:
        named_reference("docker.io", repository, tag=tag, digest=digest)
    assert caught.value.code == code


# --- normalize_upstream / normalize_repository ---------------------------------------------------------


@pytest.mark.parametrize("host", ["docker.io", "index.docker.io", "registry-1.docker.io", "Registry-1.Docker.IO"])
@pytest.mark.parametrize("port", [None, 443])
def test_docker_hub_aliases_normalize_to_docker_io(host: str, port: int | None) -> None:
    assert normalize_upstream(host, port) == "docker.io"


def test_docker_hub_alias_on_another_port_is_kept_as_is() -> None:
    assert normalize_upstream("registry-1.docker.io", 5000) == "registry-1.docker.io:5000"
    assert normalize_upstream("docker.io:8443") == "docker.io:8443"


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("ghcr.io", None, "ghcr.io"),
        ("GHCR.io", 443, "ghcr.io"),
        ("registry.example", 5000, "registry.example:5000"),
        ("registry.example", 80, "registry.example:80"),
        ("registry.example:5000", None, "registry.example:5000"),
        ("registry.example:443", None, "registry.example"),
        ("localhost", 5000, "localhost:5000"),
        ("10.0.0.1", 5000, "10.0.0.1:5000"),
        ("::1", 5000, "[::1]:5000"),
        ("[::1]", 5000, "[::1]:5000"),
        ("[::1]:5000", None, "[::1]:5000"),
        ("::1", None, "[::1]"),
        ("[0:0:0:0:0:0:0:1]", 443, "[::1]"),
        ("FE80::A", 5000, "[fe80::a]:5000"),
        # Fully qualified, with the DNS root's trailing dot: the same registry.
        ("upstream.test.", None, "upstream.test"),
        ("upstream.test.", 443, "upstream.test"),
        ("upstream.test.:5000", None, "upstream.test:5000"),
        ("Registry-1.Docker.IO.", None, "docker.io"),
    ],
)
def test_normalize_upstream(host: str, port: int | None, expected: str) -> None:
    assert normalize_upstream(host, port) == expected


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("", None),
        ("-bad.example", None),
        ("bad-.example", None),
        ("a..b", None),
        (".", None),
        ("upstream.test..", None),
        (".upstream.test", None),
        ("under_score.example", None),
        ("registry.example:", None),
        ("registry.example:abc", None),
        ("registry.example:5000", 5000),
        ("registry.example", 0),
        ("registry.example", 65536),
        ("registry.example:99999", None),
        ("[::1", None),
        ("[::1]x", None),
        ("[1.2.3.4]", None),
        ("fe80::1%eth0", None),
        ("doc\u212aer.io", None),
        ("a" * 64 + ".example", None),
        ("host/path", None),
    ],
)
def test_invalid_upstream_hosts_are_name_invalid(host: str, port: int | None) -> None:
    with pytest.raises(RouteError) as caught:
        normalize_upstream(host, port)
    assert caught.value.code == "NAME_INVALID"


def test_normalize_repository_adds_library_for_docker_hub_only() -> None:
    assert normalize_repository("docker.io", "ubuntu") == "library/ubuntu"
    assert normalize_repository("docker.io", "library/ubuntu") == "library/ubuntu"
    assert normalize_repository("docker.io", "bitnami/redis") == "bitnami/redis"
    assert normalize_repository("ghcr.io", "ubuntu") == "ubuntu"
    assert normalize_repository("docker.io:5000", "ubuntu") == "ubuntu"


# --- efficiency on huge inputs -------------------------------------------------------------------------

HUGE = 100_000


@pytest.mark.parametrize(
    "path",
    [
        "/v2/" + "a" * HUGE + "!/tags/list",
        "/v2/" + "a-" * (HUGE // 2) + "/tags/list",
        "/v2/" + "a/" * (HUGE // 2) + "tags/list",
        "/v2/" + "a__" * (HUGE // 3) + "_/tags/list",
        "/v2/app/manifests/" + "a" * HUGE,
        "/v2/app/manifests/" + "a." * (HUGE // 2) + ":x!",
        "/v2/app/blobs/sha256:" + "a" * HUGE + "!",
        "/v2/app/blobs/uploads/" + "a" * HUGE + "/x/",
        "/v2/app/blobs/uploads/" + "=" * HUGE + "!",
        "/v2/" + "%41" * HUGE,
        "/v2/" + "/" * HUGE,
    ],
)
def test_huge_inputs_are_never_taken_for_a_route(path: str) -> None:
    # With a backtracking pattern these would run for hours instead of milliseconds.
    assert not_a_valid_route(path)


# --- property tests ------------------------------------------------------------------------------------

LOWER_ALNUM = string.ascii_lowercase + string.digits
ROUTE_KEYWORDS = ["manifests", "blobs", "uploads", "tags", "list", "referrers"]

alnum_runs = st.text(LOWER_ALNUM, min_size=1, max_size=6)
separators = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def name_components(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(ROUTE_KEYWORDS))
    runs = draw(st.lists(alnum_runs, min_size=1, max_size=3))
    component = runs[0]
    for run in runs[1:]:
        component += draw(separators) + run
    return component


repositories = st.lists(name_components(), min_size=1, max_size=5).map("/".join)
tags = st.builds(
    str.__add__,
    st.sampled_from(string.ascii_letters + string.digits + "_"),
    st.text(string.ascii_letters + string.digits + "._-", max_size=127),
)
sha256_digests = st.text("0123456789abcdef", min_size=64, max_size=64).map("sha256:".__add__)
sha512_digests = st.text("0123456789abcdef", min_size=128, max_size=128).map("sha512:".__add__)
generic_digests = st.from_regex(
    r"[a-z0-9]{1,6}(?:[+._-][a-z0-9]{1,6}){0,2}:[a-zA-Z0-9=_-]{1,40}", fullmatch=True
).filter(lambda digest: digest.split(":")[0] not in ("sha256", "sha512"))
digests = st.one_of(sha256_digests, sha512_digests, generic_digests)
upload_ids = st.text(string.ascii_letters + string.digits + "-_.=", min_size=1, max_size=40).filter(
    lambda upload_id: upload_id not in (".", "..")
)

routes = st.one_of(
    st.just(Route(RouteKind.PING)),
    st.just(Route(RouteKind.CATALOG)),
    st.builds(Route, st.just(RouteKind.TAGS), repositories),
    st.builds(Route, st.just(RouteKind.MANIFEST), repositories, tag=tags),
    st.builds(Route, st.just(RouteKind.MANIFEST), repositories, digest=digests),
    st.builds(Route, st.just(RouteKind.BLOB), repositories, digest=digests),
    st.builds(Route, st.just(RouteKind.BLOB_UPLOAD), repositories),
    st.builds(Route, st.just(RouteKind.UPLOAD_SESSION), repositories, upload_id=upload_ids),
    st.builds(Route, st.just(RouteKind.REFERRERS), repositories, digest=digests),
)


@given(routes)
def test_parse_route_inverts_format_route(route: Route) -> None:
    assert parse_route(format_route(route)) == route


@given(repositories)
def test_generated_repository_names_are_accepted(repository: str) -> None:
    assert parse_route(f"/v2/{repository}/tags/list") == Route(RouteKind.TAGS, repository)


@given(repositories, st.sampled_from(string.ascii_uppercase), st.data())
def test_an_uppercase_letter_makes_a_repository_name_invalid(repository: str, letter: str, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(repository)))
    with pytest.raises(RouteError) as caught:
        Route(RouteKind.TAGS, repository[:position] + letter + repository[position:])
    assert caught.value.code == "NAME_INVALID"


path_pieces = st.one_of(
    st.sampled_from([*ROUTE_KEYWORDS, "/", "//", "%", "%2F", "%3A", "%FF", "%C3", "_catalog", "sha256:", ".."]),
    st.text(max_size=8),
)
path_like_text = st.lists(path_pieces, max_size=12).map("".join)


def assert_parses_or_raises_route_error(path: str) -> None:
    try:
        result = parse_route(path)
    except RouteError as error:
        assert error.code in {
            "NAME_INVALID",
            "TAG_INVALID",
            "DIGEST_INVALID",
            "BLOB_UPLOAD_UNKNOWN",
        }
        assert str(error)
    else:
        assert result is None or isinstance(result, Route)


@given(st.one_of(st.text(), path_like_text))
@example("\ud800")
@example("/v2/\ud800/tags/list")
def test_parse_route_on_arbitrary_text_raises_only_route_error(path: str) -> None:
    assert_parses_or_raises_route_error(path)


@given(st.one_of(st.text(), path_like_text))
@example("\x00/manifests/latest")
@example("%2F..%2F..%2Ftags/list")
def test_parse_route_under_v2_raises_only_route_error(suffix: str) -> None:
    assert_parses_or_raises_route_error("/v2/" + suffix)


@given(st.text(max_size=30), st.one_of(st.none(), st.integers(-10, 70_000)))
@example("\u212a", None)
def test_normalize_upstream_raises_only_route_error(host: str, port: int | None) -> None:
    try:
        normalize_upstream(host, port)
    except RouteError as error:
        assert error.code == "NAME_INVALID"


def test_an_address_is_remembered_only_when_short_and_read_the_same_either_way() -> None:
    long_zone = "fe80::1%" + "a" * 100_000  # a zone of any length parses, in a realm a host could name
    before = routes_module._remembered_ip_address.cache_info().currsize
    parsed = routes_module.ip_address(long_zone)
    assert isinstance(parsed, ipaddress.IPv6Address) and parsed.scope_id == "a" * 100_000
    assert routes_module._remembered_ip_address.cache_info().currsize == before
    assert routes_module.ip_address("127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert routes_module.ip_address("127.0.0.1") is routes_module.ip_address("127.0.0.1")  # remembered
    assert routes_module.ip_address("registry.test") is None and routes_module.ip_address("") is None
