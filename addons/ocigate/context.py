"""Which pull a request for content belongs to, so that it can name that pull (OCI-Named-Ref) and go to its host.

After ocigate serves a manifest for `<upstream>/<repository>:<tag>`, the client asks for what that manifest
references: the config and layers of an image, the platform manifests of an index, its subject. Those requests name
only a digest. ContextStore remembers, for every digest a served manifest references, an Origin: the named reference
of the pull (what OCI-Named-Ref says) and the host that served the manifest (asked first for what it references: the
sticky host, since a mirror that had the manifest most likely has its blobs too).

Attribution rules:

- Everything is keyed by upstream and repository as well as digest: a blob of team/app has no context when it is
  asked for in team/other, nor in team/app of another upstream (the same bytes, but another pull).
- A digest remembered more than once (under several tags, or by several clients) is attributed to the most recent
  pull of it by the client asking, when that client pulled a manifest referencing it; else to the most recent pull of
  it by anyone. A client's own older pull beats another client's newer one: two clients pulling `:v1` and `:v2` of
  images that share layers each keep naming their own tag.
- Child manifests need nothing special here: the caller remembers a child manifest (a platform manifest of an index)
  under the named reference of the pull it belongs to, which is its own origin's, so the index's tag reaches the
  child's layers too.
- The manifest a tag resolves to is referenced by nothing, yet docker and containerd fetch it by digest right after
  resolving the tag (HEAD by tag, then GET by digest). `resolved()` lends the tag to that one GET: the next
  `origin(..., fetch=True)` of that digest by the same client takes it (and uses it up), so a later pull by that
  digest names the digest, as the client asked.
- Nothing known (origin() is None, also after expiry or eviction): the caller names the request by its own digest,
  `<upstream>/<repository>@<digest>`, and asks the hosts in their configured order.

Memory is bounded by `maxsize` entries in all: the map by client (which also holds the resolved tags) gets
`maxsize - maxsize // 2` of them, the map for anyone `maxsize // 2`; each drops its least recently used entry when
full. Client ids are opaque strings and only ever key entries of the map by client, so however many clients come
and go the bound holds. An entry expires `ttl` seconds after the digest was last remembered. Of one manifest only the
first MAX_DIGESTS_PER_MANIFEST descriptors (in document order) are read, so a manifest listing absurdly many can
neither flush everything else nor hold up the event loop every other request waits on; manifests larger than
MAX_MANIFEST_SIZE are not read at all.
"""

import json
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from cachetools import TTLCache

from .headers import header_value
from .hostclient import HostResponse
from .plan import Origin, Plan
from .routes import RouteError, validate_digest
from .verify import MAX_MANIFEST_SIZE

# Real images have tens of layers (overlayfs stacks at most 128), an index a few dozen platforms and at most a few
# hundred entries with attestations; this is beyond any of them, and remembering it costs the event loop a few
# milliseconds (10,000 cost it tens of milliseconds, which every other client waited through).
MAX_DIGESTS_PER_MANIFEST = 1_000

_IMAGE = "image"
_INDEX = "index"
_SCHEMA1 = "schema1"
_ARTIFACT = "artifact"
_KIND_BY_MEDIA_TYPE = {
    "application/vnd.oci.image.manifest.v1+json": _IMAGE,
    "application/vnd.docker.distribution.manifest.v2+json": _IMAGE,
    "application/vnd.oci.image.index.v1+json": _INDEX,
    "application/vnd.docker.distribution.manifest.list.v2+json": _INDEX,
    "application/vnd.docker.distribution.manifest.v1+json": _SCHEMA1,
    "application/vnd.docker.distribution.manifest.v1+prettyjws": _SCHEMA1,
    # Withdrawn from image-spec 1.1, but registries (and oras) still serve what was pushed as one.
    "application/vnd.oci.artifact.manifest.v1+json": _ARTIFACT,
}
# The list of descriptors each kind references, besides its subject (schema1 has none).
_DESCRIPTOR_LISTS = {_IMAGE: "layers", _INDEX: "manifests", _ARTIFACT: "blobs"}

_BY_CLIENT = "client"
_RESOLVED = "resolved"


def _bare_media_type(value: object) -> str:
    """ "application/json; charset=utf-8" -> "application/json"; "" for anything that is not a string."""
    return value.split(";", 1)[0].strip().lower() if isinstance(value, str) else ""


def _manifest_kind(document: dict[str, Any], media_type: str | None) -> str | None:
    """The kind of manifest: as the Content-Type says; when that names no manifest type (missing, application/json,
    or a registry's wrong guess such as application/octet-stream), as the body's own mediaType says; else guessed
    from the keys, as docker's schema2 and schema1 manifests need not carry a mediaType."""
    kind = _KIND_BY_MEDIA_TYPE.get(_bare_media_type(media_type)) or _KIND_BY_MEDIA_TYPE.get(
        _bare_media_type(document.get("mediaType"))
    )
    if kind is not None:
        return kind
    if "fsLayers" in document:
        return _SCHEMA1
    if "manifests" in document:
        return _INDEX
    if "config" in document or "layers" in document:
        return _IMAGE
    if "blobs" in document:
        return _ARTIFACT
    return None


def _member(value: object, name: str) -> object:
    return value.get(name) if isinstance(value, dict) else None


def _items(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _candidates(document: dict[str, Any], kind: str) -> Iterator[object]:
    """What the manifest's descriptors say their digests are, in document order, unchecked."""
    if kind == _SCHEMA1:
        for layer in _items(document.get("fsLayers")):
            yield _member(layer, "blobSum")
        return
    if kind == _IMAGE:
        yield _member(document.get("config"), "digest")
    for descriptor in _items(document.get(_DESCRIPTOR_LISTS[kind])):
        yield _member(descriptor, "digest")
    yield _member(document.get("subject"), "digest")


def _well_formed(digest: object) -> bool:
    if not isinstance(digest, str):
        return False
    try:
        validate_digest(digest)
    except RouteError:
        return False
    return True


def referenced_digests(body: bytes, media_type: str | None) -> tuple[str, ...]:
    """The digests a manifest body references, in document order, each once: an image's config, layers and subject;
    an index's (manifest list's) manifests and subject; a schema1 manifest's fsLayers blobSums.

    Only well-formed digests (the OCI grammar, reference.validate_digest) of the first MAX_DIGESTS_PER_MANIFEST
    descriptors are returned. Never raises: anything that is not a manifest (not JSON, wrong types, nesting too deep
    to parse, more than MAX_MANIFEST_SIZE bytes) references nothing.
    """
    if len(body) > MAX_MANIFEST_SIZE:
        return ()
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nesting too deep
        return ()
    if not isinstance(document, dict):
        return ()
    kind = _manifest_kind(document, media_type)
    if kind is None:
        return ()
    found: dict[str, None] = {}  # a dict keeps the document order
    for candidate in islice(_candidates(document, kind), MAX_DIGESTS_PER_MANIFEST):
        if isinstance(candidate, str) and candidate not in found and _well_formed(candidate):
            found[candidate] = None
    return tuple(found)


class ContextStore:
    """The origin of every digest referenced by a manifest served recently; see the module docstring for the rules.

    Not thread-safe: mitmproxy runs addons on one event loop.
    """

    def __init__(
        self, maxsize: int = 100_000, ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if maxsize < 2:
            raise ValueError("a context store needs room for at least 2 entries (one per map)")
        if not ttl > 0:
            raise ValueError("a context store's ttl must be positive")
        # TTLCache: storing a key again replaces its value (the most recent pull wins) and restarts its ttl; a lookup
        # counts as a use for the LRU order but does not extend the ttl.
        self._by_client: TTLCache[tuple[str, ...], Origin] = TTLCache(maxsize - maxsize // 2, ttl, timer=clock)
        self._by_anyone: TTLCache[tuple[str, str, str], Origin] = TTLCache(maxsize // 2, ttl, timer=clock)

    def remember(
        self,
        client: str,
        upstream: str,
        repository: str,
        named_reference: str,
        host: str,
        body: bytes,
        media_type: str | None,
    ) -> tuple[str, ...]:
        """Records, for every digest the manifest references, where it came from (the named reference of the tag
        or digest pull and the host that served the manifest). Returns the digests recorded."""
        origin = Origin(named_reference, host)
        digests = referenced_digests(body, media_type)
        for digest in digests:
            self._by_client[(_BY_CLIENT, client, upstream, repository, digest)] = origin
            self._by_anyone[(upstream, repository, digest)] = origin
        return digests

    def served(self, client: str, plan: Plan, host: str, answer: HostResponse) -> None:
        """`host` served `client` a manifest the plan names a pull for (plan.remembers): what a GET brought
        references belongs to that pull; a tag resolved by HEAD lends its reference to the GET of its digest that
        follows."""
        route, named_reference = plan.route, plan.named_reference
        if not (plan.remembers and route.repository and named_reference and 200 <= answer.status < 300):
            return
        if plan.method == "GET":
            content_type = header_value(answer.headers, b"content-type")
            self.remember(client, plan.upstream, route.repository, named_reference, host, answer.body, content_type)
        elif route.tag and (digest := header_value(answer.headers, b"docker-content-digest")):
            self.resolved(client, plan.upstream, route.repository, digest, named_reference, host)

    def resolved(
        self, client: str, upstream: str, repository: str, digest: str, named_reference: str, host: str
    ) -> None:
        """Records that a tag (`named_reference`, served by `host`) resolved to the manifest `digest` for `client`, as
        a HEAD by tag answers: the client's next GET of that manifest by digest belongs to the tag's pull. A
        malformed digest is ignored."""
        if _well_formed(digest):
            self._by_client[(_RESOLVED, client, upstream, repository, digest)] = Origin(named_reference, host)

    def origin(self, client: str, upstream: str, repository: str, digest: str, *, fetch: bool = False) -> Origin | None:
        """The most recent origin of `digest` in that upstream's repository as seen by `client`; else the most recent
        by any client; None when nobody pulled a manifest referencing it (within ttl/maxsize).

        `fetch`: this is the GET of the manifest `digest`; a tag the client resolved to it (resolved()) comes first,
        and is used up.
        """
        if fetch:
            found = self._by_client.pop((_RESOLVED, client, upstream, repository, digest), None)
            if found is not None:
                return found
        found = self._by_client.get((_BY_CLIENT, client, upstream, repository, digest))
        if found is not None:
            return found
        return self._by_anyone.get((upstream, repository, digest))

    def __len__(self) -> int:
        """Entries held (expired ones not counted), in both maps: never more than maxsize."""
        return len(self._by_client) + len(self._by_anyone)
