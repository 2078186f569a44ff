"""What ocigate itself sent to a host never comes back out of it: a host that echoes its request's headers (some
mirrors do, in the body of a 400) would otherwise hand ocigate's credential to the client, to the log and to every
capture.

Secrets are masked where they appear, byte for byte with `*`: an answer keeps its length, so its framing
(Content-Length) stays true, and a body streamed through is masked piece by piece.
"""

import base64
import binascii
import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .headers import Lines, without

# A shorter form would mask ordinary text everywhere (a short user:password pair); the whole header value is still
# masked.
MIN_SECRET = 8
_MASK = b"*"
# What urllib.parse.quote(text, safe="") keeps: RFC 3986's unreserved characters.
_ESCAPED = re.compile(rb"[^A-Za-z0-9_.~-]")


def echo_forms(authorization: str | None) -> tuple[bytes, ...]:
    """Every form in which a host could echo the Authorization value ocigate sent it, longest first: the value, its
    credentials (a token, a Basic pair's base64) and a Basic pair decoded; each also as JSON and percent-encoding
    would write it. A password alone is not among them: a short one would be found in ordinary content (a digest, a
    date), and hosts echo what they were sent, the header."""
    if not authorization:
        return ()
    scheme, _, credentials = authorization.strip().partition(" ")
    secrets = {authorization.strip(), credentials.strip()}
    if scheme.lower() == "basic":
        try:
            pair = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            pair = ""
        secrets.add(pair)
    forms = set()
    for secret in secrets:
        if len(secret) < MIN_SECRET:
            continue
        for form in (
            secret,
            json.dumps(secret)[1:-1],
            json.dumps(secret)[1:-1].replace("/", "\\/"),
            percent_encoded(secret),
        ):
            forms.add(form.encode())
    return tuple(sorted(forms, key=len, reverse=True))


def percent_encoded(text: str) -> str:
    """`urllib.parse.quote(text, safe="")`, in one pass of a regex: urllib's loop over every byte took about half of
    echo_forms' time on a token of some hundred bytes, and echo_forms runs for every request ocigate sends."""
    return _ESCAPED.sub(lambda byte: b"%%%02X" % byte[0][0], text.encode()).decode("ascii")


class Body(enum.Enum):
    """What becomes of the body of an answer to a request that carried ocigate's own credential."""

    PASS = "pass"  # content (2xx): passed as it is
    MASK = "mask"  # masked as it passes
    DROP = "drop"  # in a content coding that could hide an echo: not passed on at all


# What frames or encodes a body, which a dropped body does not keep.
_BODY_FRAMING = (b"content-encoding", b"content-length", b"transfer-encoding")


@dataclass(frozen=True)
class MaskedAnswer:
    reason: bytes
    headers: Lines
    body: Body


def masked_answer(status: int, reason: bytes, headers: Lines, secrets: Sequence[bytes]) -> MaskedAnswer:
    """An answer's reason and headers with every echo of `secrets` masked, and what becomes of its body: whether it is
    read whole by ocigate or streamed through, a host's answer is masked by this one rule."""
    masked = mask_headers(headers, secrets)
    if not may_echo(status):
        return MaskedAnswer(mask(reason, secrets), masked, Body.PASS)
    if hides_echoes([v.decode("latin-1") for k, v in masked if k.lower() == b"content-encoding"]):
        return MaskedAnswer(mask(reason, secrets), without(masked, _BODY_FRAMING), Body.DROP)
    return MaskedAnswer(mask(reason, secrets), masked, Body.MASK)


def may_echo(status: int) -> bool:
    """Whether an answer's body is masked: one that is no content (not 2xx). Content (a manifest, a blob) is left as
    it is: it is checked against its digest, and a secret's form could stand in it by chance."""
    return status >= 300


def hides_echoes(codings: Sequence[str]) -> bool:
    """Whether a body in these Content-Encoding values (every line, every comma-separated coding in it) could hide
    an echo from masking: any coding but identity. Such a body (of an answer that may echo) is not passed on."""
    names = (name.strip().lower() for value in codings for name in value.split(","))
    return any(name not in ("", "identity") for name in names)


def mask(data: bytes, secrets: Sequence[bytes]) -> bytes:
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, _MASK * len(secret))
    return data


def mask_headers(headers: Lines, secrets: Sequence[bytes]) -> Lines:
    return tuple((name, mask(value, secrets)) for name, value in headers)


class MaskingStream:
    """A stream hook (mitmproxy's `response.stream`) that masks secrets in a body as it passes, holding back the few
    bytes a secret could still span into the next piece."""

    def __init__(self, secrets: Sequence[bytes]) -> None:
        self._secrets = secrets
        self._keep = max((len(s) for s in secrets), default=1) - 1
        self._held = b""

    def __call__(self, chunk: bytes) -> list[bytes]:
        data = mask(self._held + chunk, self._secrets)
        if chunk and self._keep:
            data, self._held = data[: -self._keep], data[-self._keep :]
        else:
            self._held = b""
        return [data] if data else []
