"""Parsing and formatting of OCI distribution API paths and image references.

Pure functions only: no I/O, no mitmproxy. Every value that reaches a Route has been checked against the
OCI distribution grammar, so code that builds upstream URLs or image references from a Route cannot be
steered into other paths by a crafted request.
"""

import enum
import functools
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

# distribution rejects longer names with NAME_INVALID
MAX_REPOSITORY_LENGTH = 255

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY_PATTERN = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
_TAG_PATTERN = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_PATTERN = re.compile(r"(?P<algorithm>[a-z0-9]+(?:[+._-][a-z0-9]+)*):(?P<encoded>[a-zA-Z0-9=_-]+)")
_UPLOAD_ID_PATTERN = re.compile(r"[a-zA-Z0-9._=-]+")
_HEX_LENGTH_BY_ALGORITHM = {"sha256": 64, "sha512": 128}
_LOWER_HEX_PATTERN = re.compile(r"[a-f0-9]+")

_HOST_LABEL_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_HOST_NAME_LENGTH = 253
_PORT_PATTERN = re.compile(r"[0-9]{1,5}")

# The port of a URL that names none. An image reference's registry is reached over https, so a registry written
# without a port is on DEFAULT_PORTS["https"].
DEFAULT_PORTS = {"https": 443, "http": 80}


def default_port(scheme: str) -> int:
    """The port a URL of `scheme` names when it names none; a scheme no host uses counts as http's."""
    return DEFAULT_PORTS.get(scheme, DEFAULT_PORTS["http"])


# Docker Hub: how image references name it, the host its registry API is served on, and the name docker's
# credential keys use. All three name one registry.
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "registry-1.docker.io"
DOCKER_HUB_INDEX = "index.docker.io"
DOCKER_HUB_ALIASES = frozenset({DOCKER_HUB, DOCKER_HUB_INDEX, DOCKER_HUB_SERVER})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHOWN_VALUE_LIMIT = 80


class RouteError(ValueError):
    """A /v2/ path that is a distribution route but is malformed. Carries an OCI error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RouteKind(enum.StrEnum):
    PING = "ping"
    CATALOG = "catalog"
    TAGS = "tags"
    MANIFEST = "manifest"
    BLOB = "blob"
    BLOB_UPLOAD = "blob_upload"
    UPLOAD_SESSION = "upload_session"
    REFERRERS = "referrers"


_KINDS_WITHOUT_REPOSITORY = frozenset({RouteKind.PING, RouteKind.CATALOG})
_KINDS_WITH_DIGEST = frozenset({RouteKind.BLOB, RouteKind.REFERRERS})


@dataclass(frozen=True)
class Route:
    """One distribution API route. Constructing a Route validates it, so every Route is well formed."""

    kind: RouteKind
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None
    upload_id: str | None = None

    def __post_init__(self) -> None:
        _check_route_fields(self)
        if self.repository is not None:
            validate_repository(self.repository)
        if self.tag is not None:
            validate_tag(self.tag)
        if self.digest is not None:
            validate_digest(self.digest)
        if self.upload_id is not None:
            validate_upload_id(self.upload_id)

    @property
    def reference(self) -> str | None:
        return self.tag if self.tag is not None else self.digest


def _check_route_fields(route: Route) -> None:
    kind = route.kind
    wants_repository = kind not in _KINDS_WITHOUT_REPOSITORY
    if (route.repository is not None) != wants_repository:
        state = "needs" if wants_repository else "takes no"
        raise RouteError("NAME_INVALID", f"a {kind} route {state} repository")
    if kind is RouteKind.MANIFEST:
        if route.tag is None and route.digest is None:
            raise RouteError("TAG_INVALID", "a manifest route needs a tag or a digest")
        if route.tag is not None and route.digest is not None:
            raise RouteError("TAG_INVALID", "a manifest route takes a tag or a digest, not both")
    else:
        if route.tag is not None:
            raise RouteError("TAG_INVALID", f"a {kind} route takes no tag")
        if (route.digest is not None) != (kind in _KINDS_WITH_DIGEST):
            state = "needs" if kind in _KINDS_WITH_DIGEST else "takes no"
            raise RouteError("DIGEST_INVALID", f"a {kind} route {state} digest")
    if (route.upload_id is not None) != (kind is RouteKind.UPLOAD_SESSION):
        state = "needs" if kind is RouteKind.UPLOAD_SESSION else "takes no"
        raise RouteError("BLOB_UPLOAD_UNKNOWN", f"a {kind} route {state} upload id")


def _shown(value: str) -> str:
    """repr() of a client-supplied value, shortened so that error messages and logs stay readable."""
    if len(value) > _SHOWN_VALUE_LIMIT:
        return repr(value[:_SHOWN_VALUE_LIMIT]) + f"... ({len(value)} characters)"
    return repr(value)


def validate_repository(repository: str) -> None:
    """Raise RouteError(NAME_INVALID) unless `repository` is a valid OCI repository name."""
    if len(repository) > MAX_REPOSITORY_LENGTH:
        raise RouteError(
            "NAME_INVALID",
            f"repository name {_shown(repository)} is invalid: longer than {MAX_REPOSITORY_LENGTH} characters",
        )
    if not _REPOSITORY_PATTERN.fullmatch(repository):
        raise RouteError(
            "NAME_INVALID",
            f"repository name {_shown(repository)} is invalid: it must be '/'-separated components of "
            "lowercase letters and digits, joined within a component by '.', '_', '__' or dashes",
        )


def validate_tag(tag: str) -> None:
    """Raise RouteError(TAG_INVALID) unless `tag` is a valid OCI tag."""
    if not _TAG_PATTERN.fullmatch(tag):
        raise RouteError(
            "TAG_INVALID",
            f"tag {_shown(tag)} is invalid: it must be 1 to 128 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'",
        )


def validate_digest(digest: str) -> None:
    """Raise RouteError(DIGEST_INVALID) unless `digest` is a valid OCI digest."""
    match = _DIGEST_PATTERN.fullmatch(digest)
    if match is None:
        raise RouteError(
            "DIGEST_INVALID",
            f"digest {_shown(digest)} is invalid: it must be '<algorithm>:<encoded>', e.g. 'sha256:<64 hex>'",
        )
    algorithm, encoded = match["algorithm"], match["encoded"]
    hex_length = _HEX_LENGTH_BY_ALGORITHM.get(algorithm)
    if hex_length is not None and (len(encoded) != hex_length or not _LOWER_HEX_PATTERN.fullmatch(encoded)):
        raise RouteError(
            "DIGEST_INVALID",
            f"digest {_shown(digest)} is invalid: {algorithm} digests need exactly {hex_length} "
            "lowercase hex characters",
        )


def validate_upload_id(upload_id: str) -> None:
    """Raise RouteError(BLOB_UPLOAD_UNKNOWN) unless `upload_id` can name an upload session."""
    # "." and ".." fit the character set but are dot segments that URL normalisation would resolve away.
    if not _UPLOAD_ID_PATTERN.fullmatch(upload_id) or upload_id in (".", ".."):
        raise RouteError(
            "BLOB_UPLOAD_UNKNOWN",
            f"upload id {_shown(upload_id)} is invalid: it must be letters, digits, '-', '_', '.' or '='",
        )


def _decode_segment(segment: str) -> str:
    if "%" not in segment:
        return segment
    # surrogatepass keeps lone surrogates from raising here; they, like invalid UTF-8, become U+FFFD,
    # which no grammar accepts.
    raw = unquote_to_bytes(segment.encode("utf-8", "surrogatepass"))
    return raw.decode("utf-8", "replace")


def parse_route(path: str) -> Route | None:
    """The distribution route of a request path (without query string), or None if it is not one.

    Raises RouteError for a path that has a distribution route's shape but an invalid name, tag, digest or upload id.
    """
    if path in ("/v2", "/v2/"):
        return Route(RouteKind.PING)
    if not path.startswith("/v2/"):
        return None
    # Split before decoding, so that an encoded "/" (%2F) cannot create path segments.
    segments = [_decode_segment(segment) for segment in path.removeprefix("/v2/").split("/")]
    if segments[-1] == "":
        segments.pop()
    return _route_from_segments(segments)


def _route_from_segments(segments: list[str]) -> Route | None:
    if segments == ["_catalog"]:
        return Route(RouteKind.CATALOG)
    # The repository name may itself contain the route keywords, so the route is decided from the end of the
    # path: the name ends at the last keyword, as in distribution's router.
    if segments[-2:] == ["tags", "list"]:
        return Route(RouteKind.TAGS, _repository_from(segments[:-2]))
    if segments[-2:] == ["blobs", "uploads"]:
        return Route(RouteKind.BLOB_UPLOAD, _repository_from(segments[:-2]))
    if len(segments) >= 3 and segments[-3:-1] == ["blobs", "uploads"]:
        return Route(RouteKind.UPLOAD_SESSION, _repository_from(segments[:-3]), upload_id=segments[-1])
    if len(segments) >= 2:
        keyword, last = segments[-2], segments[-1]
        if keyword == "manifests":
            repository = _repository_from(segments[:-2])
            if ":" in last:
                return Route(RouteKind.MANIFEST, repository, digest=last)
            return Route(RouteKind.MANIFEST, repository, tag=last)
        if keyword == "blobs":
            return Route(RouteKind.BLOB, _repository_from(segments[:-2]), digest=last)
        if keyword == "referrers":
            return Route(RouteKind.REFERRERS, _repository_from(segments[:-2]), digest=last)
    # Not a distribution route: registries serve other things under /v2/ too (token endpoints such as gcr.io's
    # /v2/token and quay.io's /v2/auth), and those must reach them untouched.
    return None


def _repository_from(components: list[str]) -> str:
    for component in components:
        if "/" in component:
            raise RouteError(
                "NAME_INVALID",
                f"repository name component {_shown(component)} is invalid: it contains an encoded '/'",
            )
    return "/".join(components)


def format_route(route: Route) -> str:
    """The request path of `route`; parse_route(format_route(route)) == route."""
    match route.kind:
        case RouteKind.PING:
            return "/v2/"
        case RouteKind.CATALOG:
            return "/v2/_catalog"
        case RouteKind.TAGS:
            return f"/v2/{route.repository}/tags/list"
        case RouteKind.MANIFEST:
            return f"/v2/{route.repository}/manifests/{route.reference}"
        case RouteKind.BLOB:
            return f"/v2/{route.repository}/blobs/{route.digest}"
        case RouteKind.BLOB_UPLOAD:
            return f"/v2/{route.repository}/blobs/uploads/"
        case RouteKind.UPLOAD_SESSION:
            return f"/v2/{route.repository}/blobs/uploads/{route.upload_id}"
        case RouteKind.REFERRERS:
            return f"/v2/{route.repository}/referrers/{route.digest}"


def named_reference(upstream: str, repository: str, *, tag: str | None = None, digest: str | None = None) -> str:
    """The image reference "<upstream>/<repository>[:<tag>][@<digest>]"; at least one of tag and digest.

    `upstream` is taken as given (normalize_upstream's result); repository, tag and digest are validated.
    """
    if tag is None and digest is None:
        raise ValueError("a named reference needs a tag, a digest or both")
    validate_repository(repository)
    reference = f"{upstream}/{repository}"
    if tag is not None:
        validate_tag(tag)
        reference += f":{tag}"
    if digest is not None:
        validate_digest(digest)
        reference += f"@{digest}"
    return reference


def normalize_upstream(host: str, port: int | None = None) -> str:
    """The registry an image reference names, from the host (and port) a client connected to.

    `host` may carry its own ":port" only when `port` is None. IPv6 literals may come with or without
    brackets. Raises RouteError(NAME_INVALID) for anything that is not a valid registry host.
    """
    # Checked before lowercasing: some non-ASCII letters lowercase to ASCII ones (KELVIN SIGN -> "k").
    if not host.isascii():
        raise RouteError("NAME_INVALID", f"registry host {_shown(host)} is invalid: it is not ASCII")
    hostname, embedded_port = split_host_port(host)
    if embedded_port is not None:
        if port is not None:
            raise RouteError(
                "NAME_INVALID", f"registry host {_shown(host)} already names a port; port {port} given too"
            )
        port = embedded_port
    if port is not None and not 1 <= port <= 65535:
        raise RouteError("NAME_INVALID", f"registry port {port} is invalid: it must be 1 to 65535")
    if port is None or port == DEFAULT_PORTS["https"]:
        return DOCKER_HUB if hostname in DOCKER_HUB_ALIASES else hostname
    return f"{hostname}:{port}"


def split_host_port(original: str) -> tuple[str, int | None]:
    """(host name or "[ipv6]", port or None) of "host", "host:port", "[ipv6]:port" or a bare IPv6 address,
    lowercased and checked; a name written fully qualified ("upstream.test.") is the name without its trailing dot.
    Raises RouteError(NAME_INVALID)."""
    host = original.lower()
    if host.startswith("["):
        address, bracket, rest = host[1:].partition("]")
        if not bracket:
            raise RouteError("NAME_INVALID", f"registry host {_shown(original)} is invalid: unclosed '['")
        hostname = _bracketed_ipv6(address, original)
        if not rest:
            return hostname, None
        if not rest.startswith(":"):
            raise RouteError("NAME_INVALID", f"registry host {_shown(original)} is invalid: unexpected text after ']'")
        return hostname, _parse_port(rest[1:], original)
    colons = host.count(":")
    if colons >= 2:
        return _bracketed_ipv6(host, original), None
    if colons == 1:
        hostname, _, port_text = host.partition(":")
        return _checked_host_name(hostname, original), _parse_port(port_text, original)
    return _checked_host_name(host, original), None


def ip_address(text: str) -> IPAddress | None:
    """The IP address `text` is (an IPv6 one without brackets), or None when it is a name or nothing at all."""
    # Remembered for short texts: every request ocigate sends asks it of the host it dials
    # (destinations.Destinations.resolve), and ipaddress's parse in Python, with its exception for a name, cost 2% of
    # the gateway's CPU for a manifest by tag. A longer text (an IPv6 zone can be of any length, in a realm a host
    # names) is parsed each time: the cache would keep it.
    return _remembered_ip_address(text) if len(text) <= _REMEMBERED_LENGTH else _parsed_ip_address(text)


# The longest IPv6 address in text is 45 characters; an interface's name as its zone is at most 15 more.
_REMEMBERED_LENGTH = 64


def _parsed_ip_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_remembered_ip_address = functools.lru_cache(maxsize=4096)(_parsed_ip_address)


def _bracketed_ipv6(address: str, original: str) -> str:
    parsed = ip_address(address)
    if not isinstance(parsed, ipaddress.IPv6Address) or parsed.scope_id is not None:
        raise RouteError(
            "NAME_INVALID", f"registry host {_shown(original)} is invalid: not an IPv6 address without zone"
        )
    return f"[{parsed.compressed}]"


def _checked_host_name(hostname: str, original: str) -> str:
    # The trailing dot names the DNS root: "upstream.test." resolves, and is routed, as "upstream.test".
    hostname = hostname.removesuffix(".")
    labels_valid = all(_HOST_LABEL_PATTERN.fullmatch(label) for label in hostname.split("."))
    if not labels_valid or len(hostname) > _MAX_HOST_NAME_LENGTH:
        raise RouteError(
            "NAME_INVALID",
            f"registry host {_shown(original)} is invalid: "
            "it must be dot-separated labels of letters, digits and inner dashes",
        )
    return hostname


def _parse_port(port_text: str, original: str) -> int:
    if not _PORT_PATTERN.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise RouteError("NAME_INVALID", f"registry host {_shown(original)} is invalid: bad port")
    return int(port_text)


def normalize_repository(upstream: str, repository: str) -> str:
    """Docker Hub's single-component names mean "library/<name>"; other names are returned unchanged."""
    if upstream == DOCKER_HUB and "/" not in repository:
        return f"library/{repository}"
    return repository
