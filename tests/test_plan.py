"""Planning: which hosts are asked, in which order, with which path, ns= and named reference."""

import re
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ocigate.hoststoml import Host, Rule
from ocigate.ocierror import OciError
from ocigate.plan import (
    Handling,
    Origin,
    classify,
    is_proxy_for,
    location_for_client,
    make_plan,
    required_capabilities,
)
from ocigate.routes import Route, RouteKind

DIGEST = "sha256:" + "a" * 64
ALL = frozenset({"pull", "resolve", "push", "referrers"})


def host(netloc: str, capabilities=ALL, *, path: str = "/v2", scheme: str = "https", **kw) -> Host:
    name, _, port = netloc.partition(":")
    default = 443 if scheme == "https" else 80
    return Host(scheme, name, int(port or default), path, frozenset(capabilities), **kw)


def plan_for(
    route: Route,
    hosts,
    method: str = "GET",
    upstream: str = "upstream.test",
    query: str = "",
    client_authenticates: bool = False,
    origin: Origin | None = None,
):
    rule = Rule(upstream, None, tuple(hosts), client_authenticates)
    return make_plan(route, method, rule, upstream, query, ["OCI-Named-Ref"], origin)


def query_of(target: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(target).query)


@pytest.mark.parametrize(
    ("route", "method", "capabilities"),
    [
        (Route(RouteKind.MANIFEST, "a/b", tag="v1"), "GET", {"pull", "resolve"}),
        (Route(RouteKind.MANIFEST, "a/b", tag="v1"), "HEAD", {"pull", "resolve"}),
        (Route(RouteKind.MANIFEST, "a/b", digest=DIGEST), "GET", {"pull"}),
        (Route(RouteKind.BLOB, "a/b", digest=DIGEST), "GET", {"pull"}),
        (Route(RouteKind.TAGS, "a/b"), "GET", {"pull", "resolve"}),
        (Route(RouteKind.REFERRERS, "a/b", digest=DIGEST), "GET", {"referrers"}),
        (Route(RouteKind.BLOB_UPLOAD, "a/b"), "POST", {"push"}),
        (Route(RouteKind.MANIFEST, "a/b", tag="v1"), "PUT", {"push"}),
        (Route(RouteKind.BLOB, "a/b", digest=DIGEST), "DELETE", {"push"}),
    ],
)
def test_required_capabilities(route: Route, method: str, capabilities: set[str]) -> None:
    assert required_capabilities(route, method) == capabilities


def test_tag_manifest_needs_both_pull_and_resolve_and_keeps_file_order() -> None:
    hosts = [
        host("pull-only.test", {"pull"}),
        host("resolve-only.test", {"resolve"}),
        host("both.test", {"pull", "resolve"}),
        host("upstream.test"),
    ]
    plan = plan_for(Route(RouteKind.MANIFEST, "team/app", tag="v1"), hosts)
    assert [a.host.host for a in plan.attempts] == ["both.test", "upstream.test"]
    by_digest = plan_for(Route(RouteKind.MANIFEST, "team/app", digest=DIGEST), hosts)
    assert [a.host.host for a in by_digest.attempts] == ["pull-only.test", "both.test", "upstream.test"]


def test_ns_goes_to_every_host_but_the_upstream_itself() -> None:
    hosts = [host("mirror.test:5000", scheme="http"), host("upstream.test")]
    plan = plan_for(Route(RouteKind.BLOB, "team/app", digest=DIGEST), hosts)
    mirror, server = plan.attempts
    assert mirror.target == f"/v2/team/app/blobs/{DIGEST}?ns=upstream.test"
    assert server.target == f"/v2/team/app/blobs/{DIGEST}"


def test_client_credentials_go_nowhere_unless_the_rule_says_the_client_authenticates_and_then_only_upstream() -> None:
    hosts = [host("mirror.test:5000", scheme="http"), host("upstream.test")]
    route = Route(RouteKind.BLOB, "team/app", digest=DIGEST)
    assert [a.forward_authorization for a in plan_for(route, hosts).attempts] == [False, False]
    client_mode = plan_for(route, hosts, client_authenticates=True)
    assert [a.forward_authorization for a in client_mode.attempts] == [False, True]


def test_docker_hub_server_gets_no_ns_but_a_mirror_does() -> None:
    assert not is_proxy_for(host("registry-1.docker.io"), "docker.io")
    assert is_proxy_for(host("mirror.gcr.io"), "docker.io")
    assert is_proxy_for(host("upstream.test:5000"), "upstream.test")


def test_client_query_is_kept_and_its_ns_replaced() -> None:
    plan = plan_for(Route(RouteKind.TAGS, "team/app"), [host("mirror.test")], query="n=10&last=a&ns=evil.test")
    assert query_of(plan.attempts[0].target) == [("n", "10"), ("last", "a"), ("ns", "upstream.test")]


def test_client_query_keeps_its_own_spelling_and_ns_is_encoded_as_containerd_does() -> None:
    plan = plan_for(
        Route(RouteKind.TAGS, "team/app"), [host("mirror.test")], upstream="up.test:5000", query="last=a%2Fb&x"
    )
    assert plan.attempts[0].target == "/v2/team/app/tags/list?last=a%2Fb&x&ns=up.test%3A5000"


def go_key(param: str) -> bytes | None:
    """A query parameter's key as Go's url.ParseQuery reads it (a Go mirror takes the first `ns`): "+" is a space,
    %XX an escaped byte, the case kept; None when Go refuses the key (a "%" without two hex digits) and so drops the
    parameter."""
    pieces = re.split(r"(%[0-9a-fA-F]{2})", param.partition("=")[0].replace("+", " "))
    if any("%" in piece for piece in pieces[::2]):
        return None
    return b"".join(bytes.fromhex(piece[1:]) if i % 2 else piece.encode() for i, piece in enumerate(pieces))


def test_client_ns_is_dropped_however_its_key_is_spelled() -> None:
    query = "n%73=evil.test&%6E%73=evil.test&n%73%3D=kept&NS=kept&nS=kept&ns+=kept&ns=evil.test&last=a"
    plan = plan_for(Route(RouteKind.TAGS, "team/app"), [host("mirror.test"), host("upstream.test")], query=query)
    mirror, server = (a.target.split("?", 1)[1] for a in plan.attempts)
    assert mirror == "n%73%3D=kept&NS=kept&nS=kept&ns+=kept&last=a&ns=upstream.test"
    assert server == "n%73%3D=kept&NS=kept&nS=kept&ns+=kept&last=a"


# Query parameters built from the pieces an `ns` could be spelled with, and anything else.
_KEY_PIECES = st.sampled_from(["n", "s", "N", "S", "%6e", "%6E", "%73", "%53", "%", "+", " ", ";", "=", "x", "%3D"])
_PARAM = st.tuples(st.lists(_KEY_PIECES, max_size=5).map("".join), st.one_of(st.none(), st.text(max_size=8))).map(
    lambda kv: kv[0] if kv[1] is None else f"{kv[0]}={kv[1]}"
)


@given(st.one_of(st.lists(_PARAM, max_size=8).map("&".join), st.text()))
@example("n%73=evil.test&last=a")
def test_any_query_gives_exactly_one_ns_to_a_mirror_none_to_the_registry_and_the_rest_byte_for_byte(query: str) -> None:
    plan = plan_for(Route(RouteKind.TAGS, "team/app"), [host("mirror.test"), host("upstream.test")], query=query)
    mirror, server = (a.target for a in plan.attempts)
    assert mirror.startswith("/v2/team/app/tags/list?")
    mirror_params = mirror.split("?", 1)[1].split("&")
    server_params = server.split("?", 1)[1].split("&") if "?" in server else []
    assert [p for p in mirror_params if go_key(p) == b"ns"] == ["ns=upstream.test"]
    assert [p for p in server_params if go_key(p) == b"ns"] == []
    others = [p for p in query.split("&") if p and go_key(p) != b"ns"]
    assert [p for p in mirror_params if go_key(p) != b"ns"] == others
    assert server_params == others


def test_override_path_replaces_v2() -> None:
    mirror = host("mirror.test", path="/registry/docker", override_path=True)
    plan = plan_for(Route(RouteKind.MANIFEST, "team/app", tag="v1"), [mirror])
    assert plan.attempts[0].target == "/registry/docker/team/app/manifests/v1?ns=upstream.test"


def test_without_context_a_request_names_its_own_reference_by_tag_or_by_digest() -> None:
    by_tag = plan_for(Route(RouteKind.MANIFEST, "team/app", tag="v1"), [host("m.test")])
    by_digest = plan_for(Route(RouteKind.MANIFEST, "team/app", digest=DIGEST), [host("m.test")])
    blob = plan_for(Route(RouteKind.BLOB, "team/app", digest=DIGEST), [host("m.test")])
    tags = plan_for(Route(RouteKind.TAGS, "team/app"), [host("m.test")])
    assert by_tag.attempts[0].headers == (("OCI-Named-Ref", "upstream.test/team/app:v1"),)
    assert by_digest.attempts[0].headers == (("OCI-Named-Ref", f"upstream.test/team/app@{DIGEST}"),)
    assert blob.attempts[0].headers == (("OCI-Named-Ref", f"upstream.test/team/app@{DIGEST}"),)
    assert tags.attempts[0].headers == ()


def test_content_of_a_tagged_pull_names_the_tag_and_is_asked_first_of_the_host_that_served_its_manifest() -> None:
    hosts = [host("a.test"), host("b.test"), host("c.test"), host("upstream.test")]
    origin = Origin("upstream.test/team/app:v1", "https://c.test/v2")
    blob = plan_for(Route(RouteKind.BLOB, "team/app", digest=DIGEST), hosts, origin=origin)
    assert [a.host.host for a in blob.attempts] == ["c.test", "a.test", "b.test", "upstream.test"]
    assert blob.named_reference == "upstream.test/team/app:v1"
    assert blob.attempts[0].headers == (("OCI-Named-Ref", "upstream.test/team/app:v1"),)
    child = plan_for(Route(RouteKind.MANIFEST, "team/app", digest=DIGEST), hosts, origin=origin)
    assert child.named_reference == "upstream.test/team/app:v1" and child.attempts[0].host.host == "c.test"
    # A tag is resolved afresh: no origin reorders or renames it.
    tag = plan_for(Route(RouteKind.MANIFEST, "team/app", tag="v2"), hosts, origin=origin)
    assert [a.host.host for a in tag.attempts] == ["a.test", "b.test", "c.test", "upstream.test"]
    assert tag.named_reference == "upstream.test/team/app:v2"


def test_pull_from_mirror_keeps_a_mirror_to_pulls_by_digest_or_by_tag_and_what_they_reference() -> None:
    hosts = [
        host("digests.test", pull_from_mirror="digest-only"),
        host("tags.test", pull_from_mirror="tag-only"),
        host("upstream.test", is_server=True),
    ]
    blob = Route(RouteKind.BLOB, "team/app", digest=DIGEST)
    tagged = Origin("upstream.test/team/app:v1", "https://upstream.test/v2")
    by_digest = Origin(f"upstream.test/team/app@{DIGEST}", "https://upstream.test/v2")
    assert [a.host.host for a in plan_for(blob, hosts, origin=tagged).attempts] == ["upstream.test", "tags.test"]
    assert [a.host.host for a in plan_for(blob, hosts, origin=by_digest).attempts] == [
        "upstream.test",
        "digests.test",
    ]
    # Content nobody is known to have pulled counts as a pull by digest, which is what the client asked for.
    assert [a.host.host for a in plan_for(blob, hosts).attempts] == ["digests.test", "upstream.test"]
    tag = Route(RouteKind.MANIFEST, "team/app", tag="v1")
    assert [a.host.host for a in plan_for(tag, hosts).attempts] == ["tags.test", "upstream.test"]


def test_host_headers_come_first_then_the_named_reference_under_every_configured_name() -> None:
    mirror = host("m.test", headers=(("X-Team", "a"), ("X-Team", "b")))
    rule = Rule("upstream.test", None, (mirror,))
    plan = make_plan(
        Route(RouteKind.MANIFEST, "team/app", tag="v1"),
        "GET",
        rule,
        "upstream.test",
        "",
        ["OCI-Named-Ref", "OCI-Ref"],
    )
    assert plan.attempts[0].headers == (
        ("X-Team", "a"),
        ("X-Team", "b"),
        ("OCI-Named-Ref", "upstream.test/team/app:v1"),
        ("OCI-Ref", "upstream.test/team/app:v1"),
    )


def test_the_client_never_names_a_reference_to_a_host_under_any_name_a_host_reads() -> None:
    rule = Rule("upstream.test", None, (host("m.test"),))
    tags = make_plan(Route(RouteKind.TAGS, "team/app"), "GET", rule, "upstream.test", "", [])
    assert tags.attempts[0].headers == () and tags.attempts[0].withheld == {"oci-named-ref", "oci-ref"}
    blob = make_plan(Route(RouteKind.BLOB, "team/app", digest=DIGEST), "GET", rule, "upstream.test", "", ["X-Ref"])
    assert blob.attempts[0].withheld == {"oci-named-ref", "oci-ref", "x-ref"}


def test_no_host_with_the_capability_gives_an_empty_plan() -> None:
    plan = plan_for(Route(RouteKind.BLOB_UPLOAD, "team/app"), [host("m.test", {"pull", "resolve"})], method="POST")
    assert plan.attempts == () and plan.capabilities == {"push"}


def test_a_push_goes_to_the_first_push_host_only_and_a_blob_head_asks_it() -> None:
    hosts = [host("pull.test", {"pull", "resolve"}), host("push-a.test"), host("push-b.test"), host("upstream.test")]
    upload = plan_for(Route(RouteKind.BLOB_UPLOAD, "team/app"), hosts, method="POST")
    assert [a.host.host for a in upload.attempts] == ["push-a.test"]
    head = plan_for(Route(RouteKind.BLOB, "team/app", digest=DIGEST), hosts, method="HEAD")
    assert [a.host.host for a in head.attempts] == ["push-a.test"]
    get = plan_for(Route(RouteKind.BLOB, "team/app", digest=DIGEST), hosts)
    assert [a.host.host for a in get.attempts] == ["pull.test", "push-a.test", "push-b.test", "upstream.test"]
    pull_only = [host("pull.test", {"pull", "resolve"})]
    head = plan_for(Route(RouteKind.BLOB, "team/app", digest=DIGEST), pull_only, method="HEAD")
    assert [a.host.host for a in head.attempts] == ["pull.test"]


def test_a_blob_head_of_a_pull_the_gateway_served_the_manifest_of_is_asked_of_the_pull_hosts() -> None:
    hosts = [host("pull-a.test", {"pull", "resolve"}), host("pull-b.test", {"pull"}), host("upstream.test")]
    origin = Origin("upstream.test/team/app:v1", "https://pull-b.test/v2")
    head = plan_for(Route(RouteKind.BLOB, "team/app", digest=DIGEST), hosts, method="HEAD", origin=origin)
    assert head.capabilities == {"pull"}
    # The sticky host first, then the others in order; the pull's reference is named.
    assert [a.host.host for a in head.attempts] == ["pull-b.test", "pull-a.test", "upstream.test"]
    assert head.named_reference == "upstream.test/team/app:v1"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/v2/team/app/blobs/uploads/u1?_state=x%2By", "/v2/team/app/blobs/uploads/u1?_state=x%2By"),
        ("http://mirror.test:5000/prefix/v2/team/app/blobs/uploads/u1", "/v2/team/app/blobs/uploads/u1"),
        ("/prefix/v2/team/app/blobs/sha256:abc", "/v2/team/app/blobs/sha256:abc"),
        ("https://storage.test/bucket/upload?sig=1", "https://storage.test/bucket/upload?sig=1"),
        ("http://mirror.test:5001/prefix/v2/x", "http://mirror.test:5001/prefix/v2/x"),
        ("/elsewhere/v2/x", "/elsewhere/v2/x"),
        ("http://mirror.test:abc/prefix/v2/x", "http://mirror.test:abc/prefix/v2/x"),
        ("http://[::1/prefix/v2/x", "http://[::1/prefix/v2/x"),
    ],
)
def test_a_location_on_the_host_becomes_a_path_on_the_upstream(location: str, expected: str) -> None:
    mirror = host("mirror.test:5000", scheme="http", path="/prefix/v2")
    assert location_for_client(location, mirror) == expected


def test_a_mirror_with_a_repository_prefix_gets_the_repository_under_it_and_the_upstream_in_ns_and_header() -> None:
    proxy_cache = host("harbor.test", repository_prefix="dockerhub-proxy")
    plan = plan_for(Route(RouteKind.MANIFEST, "library/alpine", tag="3.20"), [proxy_cache], upstream="docker.io")
    (attempt,) = plan.attempts
    assert attempt.target == "/v2/dockerhub-proxy/library/alpine/manifests/3.20?ns=docker.io"
    assert attempt.repository == "dockerhub-proxy/library/alpine"
    assert ("OCI-Named-Ref", "docker.io/library/alpine:3.20") in attempt.headers
    upload = "/v2/dockerhub-proxy/library/alpine/blobs/uploads/u1?_state=s"
    assert location_for_client(upload, proxy_cache) == "/v2/library/alpine/blobs/uploads/u1?_state=s"


def test_a_cross_repository_mount_names_its_source_as_the_host_knows_it() -> None:
    proxy_cache = host("harbor.test", repository_prefix="proxy")
    route = Route(RouteKind.BLOB_UPLOAD, "team/app")
    (attempt,) = plan_for(route, [proxy_cache], method="POST", query=f"mount={DIGEST}&from=team%2Fbase").attempts
    query = f"mount={DIGEST}&from=proxy%2Fteam%2Fbase&ns=upstream.test"
    assert attempt.target == f"/v2/proxy/team/app/blobs/uploads/?{query}"
    assert attempt.mounted_from == "proxy/team/base"
    (plain,) = plan_for(route, [host("m.test")], method="POST", query=f"mount={DIGEST}&from=team%2Fbase").attempts
    assert plain.target == f"/v2/team/app/blobs/uploads/?mount={DIGEST}&from=team%2Fbase&ns=upstream.test"
    assert plain.mounted_from == "team/base"


# Every decision on how a request is handled is the planner's: the gateway only applies it.

_PULLER = host("mirror.test", {"pull", "resolve"})
_SERVER = host("upstream.test")


@pytest.mark.parametrize(
    ("route", "method", "handling", "probe", "verify"),
    [
        (Route(RouteKind.MANIFEST, "a/b", tag="v1"), "GET", Handling.READ_WHOLE, False, None),
        (Route(RouteKind.MANIFEST, "a/b", digest=DIGEST), "HEAD", Handling.READ_WHOLE, False, None),
        (Route(RouteKind.TAGS, "a/b"), "GET", Handling.READ_WHOLE, False, None),
        (Route(RouteKind.CATALOG), "GET", Handling.READ_WHOLE, False, None),
        (Route(RouteKind.REFERRERS, "a/b", digest=DIGEST), "GET", Handling.READ_WHOLE, False, None),
        (Route(RouteKind.BLOB, "a/b", digest=DIGEST), "HEAD", Handling.READ_WHOLE, False, None),
        (Route(RouteKind.BLOB, "a/b", digest=DIGEST), "GET", Handling.STREAM, True, DIGEST),
        (Route(RouteKind.BLOB_UPLOAD, "a/b"), "POST", Handling.STREAM, False, None),
        (Route(RouteKind.MANIFEST, "a/b", tag="v1"), "PUT", Handling.STREAM, False, None),
        (Route(RouteKind.PING), "GET", Handling.PING, False, None),
    ],
)
def test_the_plan_says_who_answers_whether_hosts_are_probed_and_which_digest_is_verified(
    route: Route, method: str, handling: Handling, probe: bool, verify: str | None
) -> None:
    plan = plan_for(route, [_PULLER, _SERVER], method)
    assert (plan.handling, plan.probe, plan.verify) == (handling, probe, verify)


def test_a_ping_goes_to_the_registry_itself_only_when_its_client_authenticates() -> None:
    ours = plan_for(Route(RouteKind.PING), [_PULLER, _SERVER])
    assert ours.handling is Handling.PING and ours.attempts == ()
    theirs = plan_for(Route(RouteKind.PING), [_PULLER, _SERVER], client_authenticates=True)
    assert theirs.handling is Handling.READ_WHOLE
    assert [a.host.netloc for a in theirs.attempts] == ["upstream.test"]


def test_a_ping_sent_as_a_push_is_the_gateways_when_the_push_host_is_a_mirror() -> None:
    # The push goes to the first host that takes it; a mirror never hears the client's own credentials.
    mirror = host("mirror.test", ALL)
    plan = plan_for(Route(RouteKind.PING), [mirror, _SERVER], "POST", client_authenticates=True)
    assert plan.handling is Handling.PING and plan.attempts == ()


def test_no_host_with_the_capabilities_is_the_gateways_answer() -> None:
    plan = plan_for(Route(RouteKind.BLOB_UPLOAD, "a/b"), [_PULLER], "POST")
    assert plan.handling is Handling.NO_HOST and plan.push and plan.attempts == ()


def test_each_host_gets_the_token_scope_of_its_own_repository_name() -> None:
    prefixed = host("mirror.test", ALL, repository_prefix="cache")
    route = Route(RouteKind.BLOB_UPLOAD, "team/app")
    plan = plan_for(route, [prefixed], "POST", query="mount=" + DIGEST + "&from=team/base")
    (attempt,) = plan.attempts
    assert attempt.access.scopes == ("repository:cache/team/app:pull,push", "repository:cache/team/base:pull")
    catalog = plan_for(Route(RouteKind.CATALOG), [_SERVER])
    assert [a.access.scopes for a in catalog.attempts] == [("registry:catalog:*",)]


def test_a_manifest_that_names_its_pull_is_remembered_and_nothing_else_is() -> None:
    assert plan_for(Route(RouteKind.MANIFEST, "a/b", tag="v1"), [_SERVER]).remembers
    assert plan_for(Route(RouteKind.MANIFEST, "a/b", digest=DIGEST), [_SERVER]).remembers
    assert not plan_for(Route(RouteKind.BLOB, "a/b", digest=DIGEST), [_SERVER]).remembers
    assert not plan_for(Route(RouteKind.TAGS, "a/b"), [_SERVER]).remembers


_ROUTES = st.one_of(
    st.just(Route(RouteKind.PING)),
    st.just(Route(RouteKind.CATALOG)),
    st.builds(Route, st.just(RouteKind.TAGS), st.just("team/app")),
    st.builds(lambda t: Route(RouteKind.MANIFEST, "team/app", tag=t), st.sampled_from(["v1", "latest"])),
    st.just(Route(RouteKind.MANIFEST, "team/app", digest=DIGEST)),
    st.just(Route(RouteKind.BLOB, "team/app", digest=DIGEST)),
    st.just(Route(RouteKind.REFERRERS, "team/app", digest=DIGEST)),
    st.just(Route(RouteKind.BLOB_UPLOAD, "team/app")),
    st.just(Route(RouteKind.UPLOAD_SESSION, "team/app", upload_id="u-1")),
)
_HOSTS = st.lists(
    st.builds(
        lambda name, caps, prefix: host(f"{name}.test", caps, repository_prefix=prefix),
        st.sampled_from(["upstream", "m1", "m2", "m3"]),
        st.sets(st.sampled_from(sorted(ALL))),
        st.sampled_from([None, "cache"]),
    ),
    max_size=4,
)


@given(_ROUTES, st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE"]), _HOSTS, st.booleans())
def test_every_plan_is_consistent_with_its_own_decisions(
    route: Route, method: str, hosts: list[Host], client_authenticates: bool
) -> None:
    plan = plan_for(route, hosts, method, client_authenticates=client_authenticates)
    assert plan.method == method and plan.route == route
    if plan.handling in (Handling.PING, Handling.NO_HOST):
        assert plan.attempts == ()
    else:
        assert plan.attempts
    assert (plan.handling is Handling.PING) == (route.kind is RouteKind.PING and not plan.attempts)
    assert plan.verify == (route.digest if route.kind is RouteKind.BLOB and method == "GET" else None)
    assert plan.probe == (route.kind is RouteKind.BLOB and not plan.push)
    # ocigate reads whole what is small and not pushed (and a ping, and a blob HEAD); mitmproxy streams the rest.
    small = route.kind in (RouteKind.MANIFEST, RouteKind.TAGS, RouteKind.REFERRERS, RouteKind.CATALOG) and not plan.push
    whole = small or route.kind is RouteKind.PING or (route.kind is RouteKind.BLOB and method == "HEAD")
    if plan.attempts:
        assert plan.handling is (Handling.READ_WHOLE if whole else Handling.STREAM)
    if route.kind is RouteKind.UPLOAD_SESSION or method in ("PUT", "POST", "DELETE"):
        assert plan.push
    if plan.push:
        assert len(plan.attempts) <= 1
    for attempt in plan.attempts:
        assert plan.capabilities <= attempt.host.capabilities
        assert attempt.access.push == plan.push and attempt.access.upstream == plan.upstream
        assert attempt.access.catalog == (route.kind is RouteKind.CATALOG)
        assert attempt.access.host_repository == attempt.repository
        if attempt.repository:
            actions = "pull,push" if plan.push else "pull"
            assert attempt.access.scopes[0] == f"repository:{attempt.repository}:{actions}"


def test_a_request_the_gateway_cannot_forward_is_refused_before_any_plan() -> None:
    rule = Rule("upstream.test", None, (_SERVER,), False)
    offline = Rule("upstream.test", None, (_SERVER,), False, offline=True)
    assert classify("/v2/team/app/manifests/v1?x=1", rule, "upstream.test") == Route(
        RouteKind.MANIFEST, "team/app", tag="v1"
    )
    assert classify("/v2/app/manifests/v1", rule, "docker.io") == Route(RouteKind.MANIFEST, "library/app", tag="v1")
    assert classify("/token?scope=x", rule, "upstream.test") is None
    refused = classify("/token?scope=x", offline, "upstream.test")
    assert isinstance(refused, OciError) and refused.status == 404 and "offline" in refused.message
    bad = classify("/v2/Team/app/manifests/v1", rule, "upstream.test")
    assert isinstance(bad, OciError) and (bad.status, bad.code) == (400, "NAME_INVALID")
    assert classify("/v2/team/app/manifests/v\u00e9", rule, "upstream.test") == OciError(
        400, "UNSUPPORTED", "request target has bytes that are not percent-encoded ASCII"
    )


@given(st.text())
@example("/v2/%2F/manifests/x")
@example("/v2/a/b/blobs/sha256:zz")
def test_any_request_target_is_classified_without_an_exception(target: str) -> None:
    rule = Rule("upstream.test", None, (_SERVER,), False)
    classified = classify(target, rule, "upstream.test")
    assert classified is None or isinstance(classified, Route | OciError)
    if isinstance(classified, OciError):
        assert classified.status in (400, 404) and classified.message
