"""What a capture must not hold, and what it holds instead: each secret replaced by `<redacted>` where it stood, so
the capture still shows the exchange (`Bearer <redacted>`, `"access_token": "<redacted>"`, `password=<redacted>`).

Pure functions of text and bytes; captures.py applies them to flows. Whatever is not a secret is left exactly as it
was (a JSON body without a secret field keeps its bytes, a form its other pairs byte for byte).
"""

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, unquote, unquote_plus, urlsplit, urlunsplit

REDACTED = "<redacted>"

# One of the functions below that redact a header's value.
Redact = Callable[[str], str]

# Fields whose value is a credential, in token endpoint answers (distribution's token and OAuth2 specs: token,
# access_token, refresh_token; OpenID's id_token; docker's login answer: IdentityToken), OAuth2 forms (password,
# refresh_token, client_secret), docker's and containers' auth files (auth, identitytoken, registrytoken) and query
# strings. Compared without regard to case. The one list: `ocigate report` redacts by it too.
SECRET_FIELDS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "identity_token",
        "identitytoken",
        "registry_token",
        "registrytoken",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "auth",
    }
)


def is_secret_field(name: str) -> bool:
    return name.strip().lower() in SECRET_FIELDS


def credential(value: str) -> str:
    """An Authorization value: its scheme kept (`Bearer <redacted>`), or wholly redacted when it has none."""
    scheme, space, _ = value.strip().partition(" ")
    return f"{scheme} {REDACTED}" if space else REDACTED


def cookie(value: str) -> str:
    """A Cookie header: every cookie's name kept, its value redacted (`a=<redacted>; b=<redacted>`)."""
    return "; ".join(_cookie_pair(piece) for piece in value.split(";") if piece.strip())


def set_cookie(value: str) -> str:
    """A Set-Cookie header: the cookie's value redacted, its name and attributes (Path, Expires...) kept."""
    pair, semicolon, attributes = value.partition(";")
    return _cookie_pair(pair) + semicolon + attributes


def _cookie_pair(pair: str) -> str:
    name, equals, _ = pair.strip().partition("=")
    return f"{name}={REDACTED}" if equals else REDACTED


def form(text: str) -> str:
    """An application/x-www-form-urlencoded body or a query string: the value of each secret field redacted
    (`password=<redacted>`); every other pair, and the separators, kept as they were. Pairs are split on `;` too,
    as text_urls reads them (old Go servers split a query on `;`)."""
    pieces = _PAIR_SEPARATOR.split(text)  # pairs at even places, their separators between
    return "".join(piece if at % 2 else _form_pair(piece) for at, piece in enumerate(pieces))


_PAIR_SEPARATOR = re.compile(r"([&;])")


def _form_pair(pair: str) -> str:
    name, equals, value = pair.partition("=")
    if equals and value and (is_secret_field(unquote_plus(name)) or _holds_secret(value)):
        return f"{name}={REDACTED}"
    return pair


def _holds_secret(value: str) -> bool:
    """Whether a field's value holds what text_urls redacts, as it is (`next=https://user:pw@host/`) or
    percent-encoded: such a value is redacted whole, for a form's pair is redacted whole or kept."""
    return _text_urls(value, _ENCODINGS) != value or _encodes_secret(value, _ENCODINGS)


# How many levels of percent-encoding of one another a field's value is decoded through to find a secret (a URL in a
# query, itself in a query, ...). Each level reads the text once more: a bound keeps a line with any nesting linear.
_ENCODINGS = 3


def _encodes_secret(value: str, levels: int) -> bool:
    """Whether a field's value holds, percent-encoded, what text_urls redacts (`next=https%3A%2F%2Fu%3Apw%40h`,
    `redirect=%2Ftoken%3Faccess_token%3D...`), within `levels` decodings: such a value is redacted whole, for its
    parts cannot be redacted in place."""
    if levels <= 0 or "%" not in value:
        return False
    # Not unquote_plus: a `+` kept as it is stays within a password (`ab+cd`), where a space would end the userinfo.
    decoded = unquote(value)
    # Decoded, it holds a secret as text does, or is itself a value encoded once more.
    return decoded != value and (_text_urls(decoded, levels - 1) != decoded or _encodes_secret(decoded, levels - 1))


def json_body(data: bytes) -> bytes | None:
    """A JSON document with the value of every secret field, at any depth, redacted; the same bytes when it has
    none. None when `data` is no JSON document."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    redacted, found = _redact_json(document)
    return json.dumps(redacted).encode() if found else data


def _redact_json(value: Any) -> tuple[Any, bool]:
    if isinstance(value, dict):
        out, found = {}, False
        for key, item in value.items():
            if is_secret_field(key) and item not in (None, ""):
                out[key], found = REDACTED, True
            else:
                out[key], inner = _redact_json(item)
                found = found or inner
        return out, found
    if isinstance(value, list):
        pairs = [_redact_json(item) for item in value]
        return [item for item, _ in pairs], any(found for _, found in pairs)
    return value, False


def url(value: str) -> str:
    """A URL (a request's, a Location): the password of its userinfo redacted (a user alone is redacted whole: it
    is often a token), and the secret fields of its query and of its fragment (where OAuth's implicit flow puts
    `access_token`)."""
    try:
        parts = urlsplit(value)
        netloc = _netloc(parts)
    except ValueError:
        return text_urls(value)
    query = form(parts.query) if parts.query else parts.query
    fragment = form(parts.fragment) if parts.fragment else parts.fragment
    if netloc == parts.netloc and query == parts.query and fragment == parts.fragment:
        return value
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))


def _netloc(parts: SplitResult) -> str:
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return parts.netloc
    return f"{_userinfo(userinfo)}@{host}"


# Passwords that say the user part is the credential: GitHub's `TOKEN:x-oauth-basic@`. (An empty one too: `TOKEN:@`.)
_TOKEN_AS_USER = frozenset({"", "x-oauth-basic"})


def _userinfo(userinfo: str) -> str:
    """The password of `user:password` redacted; the user kept, to say who, unless it is the credential itself:
    a user alone (`TOKEN@`), or one whose password is empty or only says so (`TOKEN:x-oauth-basic@`), is redacted
    whole."""
    user, colon, password = userinfo.partition(":")
    if not colon or unquote_plus(password).lower() in _TOKEN_AS_USER:
        return REDACTED
    return f"{user}:{REDACTED}"


# scheme://userinfo@ within free text (an error message naming a URL), up to the authority's last @ as `url` reads it.
# A scheme is read from the start of the run of scheme characters before `://` (`1http://` too, as a sloppy line may
# glue it): without the look-behind, a long run of letters is tried from each of its letters (time quadratic in the
# run, seconds for a client's 100 KiB request line).
_USERINFO = r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#]+)@"
# ?name= or &name= within free text, with or without a URL around it (a request line names a path only); `;` and `#`
# begin a field too (old Go servers split a query on `;`, OAuth answers put fields in the fragment). A name holds no
# / : or @, so that a URL after a ? is read as one.
_FIELD = r"(?P<separator>[?&;#])(?P<name>[^\s=&#?;/:@]+)="
_IN_TEXT = re.compile(f"{_USERINFO}|{_FIELD}")
# A secret field's value: to the next &, ;, # or white space. Not to a quote: a value may hold one (a repr then
# quotes with ").
_VALUE = re.compile(r"[^\s&#;]*")


def text_urls(text: str) -> str:
    """Free text (a log line, a flow's comment) with what every URL in it may carry as a secret redacted: the
    userinfo as `url` does, the value of each secret query field (`token=<redacted>`), whether or not a scheme
    and host come before the query, and a value that holds either percent-encoded (redacted whole). In time linear
    in the text: another field's value is read on as text, so that a URL within it
    (`?next=https://user:password@host/`) is redacted too, and decoded through at most _ENCODINGS levels."""
    return _text_urls(text, _ENCODINGS)


def _text_urls(text: str, levels: int) -> str:
    out: list[str] = []
    position = 0
    # Where the last value decoded whole ends: a field within it (after a raw `?`) was decoded with it, and is not
    # decoded again, so that each character is decoded at most once a level.
    decoded_to = 0
    while (match := _IN_TEXT.search(text, position)) is not None:
        out.append(text[position : match.start()])
        if match["scheme"] is not None:
            out.append(f"{match['scheme']}{_userinfo(match['userinfo'])}@")
            position = match.end()
        elif is_secret_field(unquote_plus(match["name"])):
            value = _VALUE.match(text, match.end())  # it matches the empty string too
            out.append(f"{match[0]}{REDACTED}")
            position = value.end() if value is not None else match.end()
        elif match.start() >= decoded_to and (value := _VALUE.match(text, match.end())) is not None:
            if _encodes_secret(value[0], levels):
                out.append(f"{match[0]}{REDACTED}")
                position = value.end()
            else:
                out.append(match[0])
                position, decoded_to = match.end(), value.end()
        else:
            out.append(match[0])
            position = match.end()
    out.append(text[position:])
    return "".join(out)


def is_form(content_type: str | None) -> bool:
    return _media_type(content_type) == "application/x-www-form-urlencoded"


def may_hold_fields(content_type: str | None) -> bool:
    """Whether a body of this Content-Type may hold secret fields: a form, JSON (of any kind: `+json` too), text
    (token endpoints answer JSON as text/plain too) or a body of no stated type. Not a blob, a tarball, an image."""
    kind = _media_type(content_type)
    return not kind or is_form(content_type) or kind.startswith("text/") or "json" in kind


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def in_strings(value: Any) -> Any:
    """A plain value (a flow's record: dicts, lists, strings, numbers) with the secrets of every URL in its strings
    redacted (`text_urls`)."""
    if isinstance(value, str):
        return text_urls(value)
    if isinstance(value, dict):
        return {key: in_strings(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(in_strings(item) for item in value)
    return value


def body(content_type: str | None, data: bytes) -> bytes | None:
    """A request's or answer's (decoded) body with its secret fields redacted, read by what it is: a form when its
    Content-Type says so, else JSON whatever its Content-Type (token endpoints answer JSON as text/plain too).
    `data` itself when it holds no secret; None when it could not be read as either (nothing in it is known to be a
    secret)."""
    if is_form(content_type):
        # surrogateescape: bytes that are no UTF-8 come back out as they were
        text = data.decode("utf-8", "surrogateescape")
        redacted = form(text)
        return data if redacted == text else redacted.encode("utf-8", "surrogateescape")
    return json_body(data)
