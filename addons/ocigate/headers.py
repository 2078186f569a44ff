"""Header lines as every module handles them: (name, value) byte pairs in the order they came, as mitmproxy's
`Headers.fields` and h11 give them, so that repeated lines stay repeated and nothing is decoded twice."""

from collections.abc import Iterable

# A message's header lines.
Lines = tuple[tuple[bytes, bytes], ...]

# Hop-by-hop headers belong to one connection, never to the message forwarded on another.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header `name` (lowercase), stripped; None when there is none."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def without(headers: Iterable[tuple[bytes, bytes]], names: Iterable[bytes]) -> Lines:
    """The lines whose names (lowercase) are not in `names`."""
    dropped = frozenset(names)
    return tuple((k, v) for k, v in headers if k.lower() not in dropped)


# Content codings that name the same thing (RFC 9110 8.4.1.3: x-gzip is gzip).
_CODING_ALIASES = {"x-gzip": "gzip", "x-compress": "compress"}


def accepts_coding(headers: Iterable[tuple[bytes, bytes]], coding: str) -> bool:
    """Whether the request's Accept-Encoding (every line of it) accepts the content coding `coding`: named, or by
    `*`, with a weight above 0. A request without one is taken to accept none: RFC 9110 would allow any, but a
    client that names no coding (curl without --compressed, a script) does not decode one."""
    wanted = _CODING_ALIASES.get(coding.strip().lower(), coding.strip().lower())
    weights: dict[str, bool] = {}
    for key, value in headers:
        if key.lower() != b"accept-encoding":
            continue
        for item in value.decode("latin-1").split(","):
            name, _, parameters = item.partition(";")
            name = name.strip().lower()
            if name:
                weights.setdefault(_CODING_ALIASES.get(name, name), _weight_above_zero(parameters))
    if wanted in weights:
        return weights[wanted]
    return weights.get("*", False)


def _weight_above_zero(parameters: str) -> bool:
    """A coding's `q=` (absent: 1); one that does not parse counts as absent, as most servers read it."""
    for parameter in parameters.split(";"):
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value.strip()) > 0
            except ValueError:
                return True
    return True
