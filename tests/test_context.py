import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocigate.context import MAX_DIGESTS_PER_MANIFEST, ContextStore, referenced_digests
from ocigate.hostclient import HostResponse
from ocigate.hoststoml import Host, Rule
from ocigate.plan import Origin, Plan, make_plan
from ocigate.routes import Route, RouteError, RouteKind, validate_digest
from ocigate.verify import MAX_MANIFEST_SIZE
from tests.support.images import OCI_INDEX, OCI_MANIFEST, make_image, make_index

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
ARTIFACT_MANIFEST = "application/vnd.oci.artifact.manifest.v1+json"

UPSTREAM = "upstream.test"
REPOSITORY = "team/app"
MIRROR_A = "http://mirror-a.test:5000/v2"
MIRROR_B = "http://mirror-b.test:5000/v2"
V1 = f"{UPSTREAM}/{REPOSITORY}:v1"
V2 = f"{UPSTREAM}/{REPOSITORY}:v2"
V3 = f"{UPSTREAM}/{REPOSITORY}:v3"


def digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def body(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def docker_manifest(config: str, layers: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2, "digest": config},
        "layers": [
            {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 3, "digest": layer}
            for layer in layers
        ],
        **extra,
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- referenced_digests ------------------------------------------------------------------------------------------


def test_oci_image_references_config_then_layers():
    image = make_image("context-image", layers=3, layer_size=64)
    expected = (image.config.digest, *(layer.digest for layer in image.layers))
    assert referenced_digests(image.manifest.data, OCI_MANIFEST) == expected


def test_oci_index_references_its_platform_manifests():
    index = make_index("context-index", layers=1, layer_size=64)
    expected = tuple(image.manifest.digest for image in index.images)
    assert len(expected) == 2
    assert referenced_digests(index.manifest.data, OCI_INDEX) == expected


@pytest.mark.parametrize("media_type", [None, "", "application/json", "Application/JSON; charset=utf-8"])
def test_without_a_manifest_content_type_the_body_media_type_decides(media_type):
    # The body has both lists; its own mediaType says it is an index, so the layers are not its references.
    document = {"mediaType": OCI_INDEX, "manifests": [{"digest": digest("child")}], "layers": [{"digest": digest("l")}]}
    assert referenced_digests(body(document), media_type) == (digest("child"),)


def test_the_content_type_beats_the_body_media_type():
    document = {"mediaType": OCI_INDEX, "manifests": [{"digest": digest("child")}], "layers": [{"digest": digest("l")}]}
    assert referenced_digests(body(document), OCI_MANIFEST + "; charset=utf-8") == (digest("l"),)


def test_docker_v2_manifest_with_parameters_in_the_content_type():
    document = docker_manifest(digest("config"), [digest("base"), digest("app")])
    assert referenced_digests(body(document), f"{DOCKER_MANIFEST}; charset=utf-8") == (
        digest("config"),
        digest("base"),
        digest("app"),
    )


def test_docker_manifest_list():
    document = {
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [
            {"mediaType": DOCKER_MANIFEST, "size": 7, "digest": digest("amd64"), "platform": {"os": "linux"}},
            {"mediaType": DOCKER_MANIFEST, "size": 7, "digest": digest("arm64"), "platform": {"os": "linux"}},
        ],
    }
    assert referenced_digests(body(document), DOCKER_LIST) == (digest("amd64"), digest("arm64"))


@pytest.mark.parametrize("media_type", [DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, None])
def test_docker_schema1_blob_sums_in_order_without_repeats(media_type):
    # schema1 lists the newest layer first and repeats the empty layer's blobSum for every metadata-only step.
    empty = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"
    document = {
        "schemaVersion": 1,
        "name": REPOSITORY,
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": empty}, {"blobSum": digest("top")}, {"blobSum": empty}, {"blobSum": digest("base")}],
        "history": [{"v1Compatibility": "{}"}] * 4,
        "signatures": [{"header": {"alg": "ES256"}, "signature": "x", "protected": "y"}],
    }
    assert referenced_digests(body(document), media_type) == (empty, digest("top"), digest("base"))


def test_image_manifest_with_a_subject_references_it_last():
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": digest("{}")},
        "layers": [{"mediaType": "application/spdx+json", "size": 10, "digest": digest("sbom")}],
        "subject": {"mediaType": OCI_MANIFEST, "size": 500, "digest": digest("signed image")},
    }
    assert referenced_digests(body(document), OCI_MANIFEST) == (digest("{}"), digest("sbom"), digest("signed image"))


def test_index_with_a_subject():
    document = {"mediaType": OCI_INDEX, "manifests": [{"digest": digest("a")}], "subject": {"digest": digest("s")}}
    assert referenced_digests(body(document), OCI_INDEX) == (digest("a"), digest("s"))


def test_artifact_manifest_blobs_and_subject():
    document = {"mediaType": ARTIFACT_MANIFEST, "blobs": [{"digest": digest("b")}], "subject": {"digest": digest("s")}}
    assert referenced_digests(body(document), None) == (digest("b"), digest("s"))


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"schemaVersion": 2, "config": {"digest": digest("c")}, "layers": [{"digest": digest("l")}]}, ("c", "l")),
        ({"schemaVersion": 2, "manifests": [{"digest": digest("m")}]}, ("m",)),
        ({"schemaVersion": 1, "fsLayers": [{"blobSum": digest("f")}]}, ("f",)),
        ({"schemaVersion": 2, "subject": {"digest": digest("s")}}, ()),  # no manifest keys: not a manifest
    ],
)
def test_without_any_media_type_the_keys_decide(document, expected):
    assert referenced_digests(body(document), None) == tuple(digest(name) for name in expected)


def test_same_digest_as_config_and_layer_is_returned_once():
    document = docker_manifest(digest("same"), [digest("same"), digest("other"), digest("same")])
    assert referenced_digests(body(document), DOCKER_MANIFEST) == (digest("same"), digest("other"))


def test_only_well_formed_digests_are_returned():
    good = [digest("ok"), "sha512:" + hashlib.sha512(b"x").hexdigest(), "blake3:abcDEF012=_-"]
    bad: list[Any] = [
        "sha256:" + "0" * 63,  # too short
        "sha256:" + hashlib.sha256(b"x").hexdigest().upper(),  # sha256 wants lowercase hex
        "SHA256:" + "0" * 64,  # uppercase algorithm
        "sha256" + "0" * 64,  # no colon
        f" {digest('space')}",
        f"{digest('newline')}\n",
        "",
        42,
        None,
        ["sha256:" + "0" * 64],
        {"digest": digest("nested")},
    ]
    document = {"mediaType": OCI_MANIFEST, "layers": [{"digest": value} for value in [*bad, *good]]}
    assert referenced_digests(body(document), OCI_MANIFEST) == tuple(good)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe\xfa",
        b"null",
        b"[]",
        b'"sha256:' + b"0" * 64 + b'"',
        b"[" * 200_000,
        b'{"layers": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"mediaType": 7, "config": "sha256:x", "layers": {"digest": 1}, "subject": [], "manifests": null}',
        b'{"layers": [{"digest": "' + digest("trailing").encode() + b'"}]} trailing garbage',
    ],
)
def test_anything_else_references_nothing(raw):
    assert referenced_digests(raw, OCI_MANIFEST) == ()
    assert referenced_digests(raw, None) == ()


def test_nesting_too_deep_to_parse_references_nothing():
    # Valid JSON, but deeper than the parser recurses: the layers are never seen.
    deep = b'{"layers": [{"digest": "' + digest("deep").encode() + b'"}], "x": ' + b"[" * 100_000 + b"]" * 100_000
    assert referenced_digests(deep + b"}", OCI_MANIFEST) == ()


def test_a_body_over_the_manifest_size_limit_is_not_read():
    document = docker_manifest(digest("config"), [digest("layer")])
    small = body(document)
    assert referenced_digests(small, DOCKER_MANIFEST) == (digest("config"), digest("layer"))
    document["annotations"] = {"padding": "x" * (MAX_MANIFEST_SIZE - len(small))}
    assert len(body(document)) > MAX_MANIFEST_SIZE
    assert referenced_digests(body(document), DOCKER_MANIFEST) == ()


def test_a_manifest_with_too_many_layers_records_the_first_ones():
    layers = [digest(str(number)) for number in range(MAX_DIGESTS_PER_MANIFEST + 5)]
    document = docker_manifest(digest("config"), layers)
    found = referenced_digests(body(document), DOCKER_MANIFEST)
    assert len(found) == MAX_DIGESTS_PER_MANIFEST
    assert found == (digest("config"), *layers[: MAX_DIGESTS_PER_MANIFEST - 1])


def test_only_the_first_descriptors_are_read_even_when_they_are_not_digests():
    junk = [{"digest": "not a digest"}] * MAX_DIGESTS_PER_MANIFEST
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*junk, {"digest": digest("late")}]}
    assert referenced_digests(body(document), OCI_INDEX) == ()


# -- referenced_digests: properties ------------------------------------------------------------------------------


def _well_formed(value: str) -> bool:
    try:
        validate_digest(value)
    except RouteError:
        return False
    return True


_MANIFEST_KEYS = ["mediaType", "config", "layers", "manifests", "subject", "fsLayers", "blobSum", "digest", "blobs"]
_MEDIA_TYPES = [None, "application/json", OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, DOCKER_SCHEMA1]
_digestish = st.one_of(
    st.builds(digest, st.text(max_size=3)),
    st.from_regex(r"[a-z0-9]{1,8}([+._-][a-z0-9]{1,4})?:[a-zA-Z0-9=_-]{0,70}", fullmatch=True),
    st.text(max_size=20),
)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _digestish
    | st.sampled_from(_MEDIA_TYPES[1:]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(_MANIFEST_KEYS) | st.text(max_size=5), children, max_size=6)
    ),
    max_leaves=40,
)


def _check(found: object) -> None:
    assert isinstance(found, tuple)
    assert len(set(found)) == len(found)
    assert all(isinstance(value, str) and _well_formed(value) for value in found)


@settings(max_examples=300)
@given(raw=st.binary(max_size=300), media_type=st.sampled_from(_MEDIA_TYPES) | st.text(max_size=10))
def test_arbitrary_bytes_never_raise(raw, media_type):
    _check(referenced_digests(raw, media_type))


@settings(max_examples=500)
@given(value=_json_values, media_type=st.sampled_from(_MEDIA_TYPES))
def test_arbitrary_json_never_raises_and_returns_only_digests_it_contains(value, media_type):
    text = json.dumps(value, ensure_ascii=False)
    found = referenced_digests(text.encode("utf-8", "surrogatepass"), media_type)
    _check(found)
    for value_found in found:
        assert f'"{value_found}"' in text


# -- ContextStore ------------------------------------------------------------------------------------------------


def test_a_tag_pull_attributes_config_and_layers_to_the_tag_and_the_host_that_served_it():
    image = make_image("context-store", layers=2, layer_size=64)
    store = ContextStore()
    recorded = store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_B, image.manifest.data, OCI_MANIFEST)
    assert recorded == (image.config.digest, *(layer.digest for layer in image.layers))
    for blob in (image.config, *image.layers):
        assert store.origin("client-1", UPSTREAM, REPOSITORY, blob.digest) == Origin(V1, MIRROR_B)
    # The manifest itself was not referenced by anything, nor was anything else.
    assert store.origin("client-1", UPSTREAM, REPOSITORY, image.manifest.digest) is None
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("never seen")) is None


def test_an_index_tag_reaches_the_layers_of_its_platform_manifests():
    index = make_index("context-inherit", layers=2, layer_size=64)
    store = ContextStore()
    store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_B, index.manifest.data, OCI_INDEX)
    child = index.images[1]
    inherited = store.origin("client-1", UPSTREAM, REPOSITORY, child.manifest.digest)
    assert inherited == Origin(V1, MIRROR_B)
    assert store.origin("client-1", UPSTREAM, REPOSITORY, child.layers[0].digest) is None
    # The caller remembers the child manifest under the named reference it inherited (and the host that served the
    # child, which may differ).
    store.remember("client-1", UPSTREAM, REPOSITORY, inherited.named_reference, MIRROR_A, child.manifest.data, None)
    for blob in (child.config, *child.layers):
        assert store.origin("client-1", UPSTREAM, REPOSITORY, blob.digest) == Origin(V1, MIRROR_A)
    # The other platform's layers were not pulled.
    assert store.origin("client-1", UPSTREAM, REPOSITORY, index.images[0].layers[0].digest) is None


def test_the_most_recent_pull_by_the_same_client_wins():
    shared = docker_manifest(digest("config"), [digest("base")])
    store = ContextStore()
    store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_A, body(shared), DOCKER_MANIFEST)
    store.remember("client-1", UPSTREAM, REPOSITORY, V2, MIRROR_B, body(shared), DOCKER_MANIFEST)
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("base")) == Origin(V2, MIRROR_B)


def test_a_client_keeps_its_own_pull_and_others_get_the_most_recent_of_anyone():
    v1 = docker_manifest(digest("config-1"), [digest("base"), digest("app-1")])
    v2 = docker_manifest(digest("config-2"), [digest("base"), digest("app-2")])
    store = ContextStore()
    store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_A, body(v1), DOCKER_MANIFEST)
    # client-2 pulled nothing yet: anyone's pull it is.
    assert store.origin("client-2", UPSTREAM, REPOSITORY, digest("base")) == Origin(V1, MIRROR_A)
    store.remember("client-2", UPSTREAM, REPOSITORY, V2, MIRROR_B, body(v2), DOCKER_MANIFEST)
    # client-1's own older pull beats client-2's newer one; client-3 gets the newest of anyone's.
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("base")) == Origin(V1, MIRROR_A)
    assert store.origin("client-2", UPSTREAM, REPOSITORY, digest("base")) == Origin(V2, MIRROR_B)
    assert store.origin("client-3", UPSTREAM, REPOSITORY, digest("base")) == Origin(V2, MIRROR_B)
    # A digest only client-1's pull referenced is client-1's for everyone.
    assert store.origin("client-2", UPSTREAM, REPOSITORY, digest("app-1")) == Origin(V1, MIRROR_A)


def test_the_same_digest_in_another_repository_or_upstream_has_no_context():
    image = docker_manifest(digest("config"), [digest("base")])
    store = ContextStore()
    store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_A, body(image), DOCKER_MANIFEST)
    assert store.origin("client-1", UPSTREAM, "team/other", digest("base")) is None
    assert store.origin("client-1", "other.test", REPOSITORY, digest("base")) is None
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("base")) == Origin(V1, MIRROR_A)
    other = f"{UPSTREAM}/team/other:v9"
    store.remember("client-1", UPSTREAM, "team/other", other, MIRROR_B, body(image), DOCKER_MANIFEST)
    assert store.origin("client-1", UPSTREAM, "team/other", digest("base")) == Origin(other, MIRROR_B)
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("base")) == Origin(V1, MIRROR_A)


def test_a_pull_by_digest_is_recorded_under_its_digest_reference():
    child = make_image("context-by-digest", layers=1, layer_size=64)
    by_digest = f"{UPSTREAM}/{REPOSITORY}@{child.manifest.digest}"
    store = ContextStore()
    store.remember("client-1", UPSTREAM, REPOSITORY, by_digest, MIRROR_A, child.manifest.data, OCI_MANIFEST)
    assert store.origin("client-1", UPSTREAM, REPOSITORY, child.layers[0].digest) == Origin(by_digest, MIRROR_A)


def test_a_tag_resolved_by_head_names_the_get_by_digest_that_follows_once():
    image = make_image("context-resolved", layers=1, layer_size=64)
    manifest = image.manifest.digest
    store = ContextStore()
    # HEAD by tag: no body, but the registry said which digest the tag is.
    store.resolved("10.0.0.1", UPSTREAM, REPOSITORY, manifest, V1, MIRROR_B)
    # A HEAD by digest, another client, another repository: not the GET that follows.
    assert store.origin("10.0.0.1", UPSTREAM, REPOSITORY, manifest) is None
    assert store.origin("10.0.0.2", UPSTREAM, REPOSITORY, manifest, fetch=True) is None
    assert store.origin("10.0.0.1", UPSTREAM, "team/other", manifest, fetch=True) is None
    assert store.origin("10.0.0.1", UPSTREAM, REPOSITORY, manifest, fetch=True) == Origin(V1, MIRROR_B)
    # Used up: a later pull by that digest names the digest.
    assert store.origin("10.0.0.1", UPSTREAM, REPOSITORY, manifest, fetch=True) is None
    assert len(store) == 0


def test_a_resolved_tag_beats_an_older_reference_to_the_same_manifest():
    index = make_index("context-resolved-child", layers=1, layer_size=64)
    child = index.images[0].manifest.digest
    store = ContextStore()
    store.remember("10.0.0.1", UPSTREAM, REPOSITORY, V1, MIRROR_A, index.manifest.data, OCI_INDEX)
    store.resolved("10.0.0.1", UPSTREAM, REPOSITORY, child, V2, MIRROR_B)  # :v2 is that platform's image alone
    assert store.origin("10.0.0.1", UPSTREAM, REPOSITORY, child, fetch=True) == Origin(V2, MIRROR_B)
    assert store.origin("10.0.0.1", UPSTREAM, REPOSITORY, child, fetch=True) == Origin(V1, MIRROR_A)


def test_a_malformed_resolved_digest_is_ignored():
    store = ContextStore()
    store.resolved("10.0.0.1", UPSTREAM, REPOSITORY, "sha256:nope", V1, MIRROR_B)
    assert len(store) == 0


def test_entries_expire_ttl_seconds_after_they_were_last_remembered():
    clock = Clock()
    store = ContextStore(ttl=10.0, clock=clock)
    first = docker_manifest(digest("config"), [digest("kept"), digest("dropped")])
    again = docker_manifest(digest("config"), [digest("kept")])
    store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_A, body(first), DOCKER_MANIFEST)
    clock.now += 6
    store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_A, body(again), DOCKER_MANIFEST)
    clock.now += 3.9  # 9.9 s after the first pull
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("dropped")) == Origin(V1, MIRROR_A)
    assert len(store) == 6
    clock.now += 0.1  # 10 s after the first pull, 4 s after the second
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("dropped")) is None
    assert store.origin("client-2", UPSTREAM, REPOSITORY, digest("dropped")) is None
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("kept")) == Origin(V1, MIRROR_A)
    assert len(store) == 4
    clock.now += 6  # 10 s after the second pull
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("kept")) is None
    assert len(store) == 0


def test_memory_stays_within_maxsize_however_many_clients_and_layers():
    store = ContextStore(maxsize=10)
    for number in range(200):
        layers = [digest(f"{number}/{layer}") for layer in range(7)]
        manifest = body(docker_manifest(layers[0], layers[1:]))
        store.remember(f"client-{number}", UPSTREAM, REPOSITORY, V1, MIRROR_A, manifest, None)
        assert len(store) <= 10
    assert len(store) == 10
    # The least recently remembered went first: the last manifest's last layers are known, the first's are not.
    assert store.origin("client-199", UPSTREAM, REPOSITORY, digest("199/6")) == Origin(V1, MIRROR_A)
    assert store.origin("client-199", UPSTREAM, REPOSITORY, digest("0/6")) is None
    assert store.origin("client-0", UPSTREAM, REPOSITORY, digest("0/6")) is None


def test_a_recently_asked_for_entry_is_evicted_last():
    store = ContextStore(maxsize=4)  # two entries in each map
    store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_A, body(docker_manifest(digest("a"), [])), None)
    store.remember("client-1", UPSTREAM, REPOSITORY, V2, MIRROR_A, body(docker_manifest(digest("b"), [])), None)
    # Found in client-1's map, which keeps it; anyone's map was not asked, so "a" is the oldest there.
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("a")) == Origin(V1, MIRROR_A)
    store.remember("client-1", UPSTREAM, REPOSITORY, V3, MIRROR_A, body(docker_manifest(digest("c"), [])), None)
    assert len(store) == 4
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("a")) == Origin(V1, MIRROR_A)
    assert store.origin("client-2", UPSTREAM, REPOSITORY, digest("a")) is None
    # client-1's entry for "b" went; anyone's is still there.
    assert store.origin("client-2", UPSTREAM, REPOSITORY, digest("b")) == Origin(V2, MIRROR_A)
    assert store.origin("client-1", UPSTREAM, REPOSITORY, digest("c")) == Origin(V3, MIRROR_A)


def test_nothing_is_recorded_for_a_body_that_is_not_a_manifest():
    store = ContextStore()
    assert store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_A, b"<html>", "text/html") == ()
    assert len(store) == 0


@pytest.mark.parametrize(("maxsize", "ttl"), [(1, 10.0), (0, 10.0), (10, 0.0), (10, -1.0)])
def test_a_store_with_no_room_or_no_lifetime_is_refused(maxsize, ttl):
    with pytest.raises(ValueError):
        ContextStore(maxsize=maxsize, ttl=ttl)


def index_of(manifests: list[str], **extra: Any) -> bytes:
    descriptors = [{"mediaType": OCI_MANIFEST, "size": 500, "digest": manifest} for manifest in manifests]
    return body({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors, **extra})


def test_an_index_with_a_few_hundred_entries_and_a_subject_is_remembered_whole():
    manifests = [digest(f"platform {number}") for number in range(400)]
    store = ContextStore()
    recorded = store.remember(
        "client-1", UPSTREAM, REPOSITORY, V1, MIRROR_B, index_of(manifests, subject={"digest": digest("subject")}), None
    )
    assert recorded == (*manifests, digest("subject"))
    assert all(store.origin("client-1", UPSTREAM, REPOSITORY, d) == Origin(V1, MIRROR_B) for d in recorded)


def test_an_index_of_45000_references_remembers_no_more_than_the_cap():
    manifests = [digest(str(number)) for number in range(45_000)]
    # As small as descriptors go, to stay under the size limit (which is tested on its own).
    huge = json.dumps({"manifests": [{"digest": manifest} for manifest in manifests]}, separators=(",", ":")).encode()
    assert len(huge) <= MAX_MANIFEST_SIZE
    store = ContextStore()
    recorded = store.remember("client-1", UPSTREAM, REPOSITORY, V1, MIRROR_B, huge, OCI_INDEX)
    assert recorded == tuple(manifests[:MAX_DIGESTS_PER_MANIFEST])
    # Both maps, the client's and anyone's, hold one entry per digest remembered.
    assert len(store) == 2 * MAX_DIGESTS_PER_MANIFEST
    assert store.origin("client-1", UPSTREAM, REPOSITORY, manifests[-1]) is None


# -- served: what the gateway tells the store of a manifest it served ---------------------------------------------


def _plan(route: Route, method: str) -> Plan:
    rule = Rule(UPSTREAM, None, (Host("http", "mirror-a.test", 5000, "/v2", frozenset({"pull", "resolve"})),), False)
    return make_plan(route, method, rule, UPSTREAM, "", ["OCI-Named-Ref"])


def test_a_served_manifest_gives_what_it_references_to_its_pull_and_nothing_else_does() -> None:
    store = ContextStore()
    layer, manifest = digest("layer"), body(docker_manifest(digest("config"), [digest("layer")]))
    by_tag = _plan(Route(RouteKind.MANIFEST, REPOSITORY, tag="v1"), "GET")
    headers = ((b"Content-Type", DOCKER_MANIFEST.encode()),)
    store.served("c1", by_tag, MIRROR_A, HostResponse(404, b"", headers, manifest))
    assert store.origin("c1", UPSTREAM, REPOSITORY, layer) is None  # a 404 served no manifest
    tags = _plan(Route(RouteKind.TAGS, REPOSITORY), "GET")
    store.served("c1", tags, MIRROR_A, HostResponse(200, b"", headers, manifest))
    assert store.origin("c1", UPSTREAM, REPOSITORY, layer) is None  # a tag list names no pull
    store.served("c1", by_tag, MIRROR_A, HostResponse(200, b"", headers, manifest))
    assert store.origin("c1", UPSTREAM, REPOSITORY, layer) == Origin(V1, MIRROR_A)


def test_a_tag_resolved_by_head_lends_its_reference_to_the_get_of_its_digest() -> None:
    store = ContextStore()
    resolved = digest("manifest")
    head = _plan(Route(RouteKind.MANIFEST, REPOSITORY, tag="v1"), "HEAD")
    store.served("c1", head, MIRROR_A, HostResponse(200, b"", ((b"Docker-Content-Digest", resolved.encode()),), b""))
    assert store.origin("c1", UPSTREAM, REPOSITORY, resolved, fetch=True) == Origin(V1, MIRROR_A)
