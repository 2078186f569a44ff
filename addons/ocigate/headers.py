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
