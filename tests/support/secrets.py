"""The secrets the tests hand to gateways, so that the whole run can check that none of them ever shows up in a
gateway's output: its log (whatever flow_detail), or a capture it wrote."""

import base64
import json
from pathlib import Path
from urllib.parse import quote

# A JWT's header is base64 of '{"': any bearer token the token servers issue starts with it.
JWT_START = "eyJ"

_remembered: set[str] = set()


def remember(*secrets: str) -> None:
    _remembered.update(secrets)


def leaks_in(directory: Path) -> list[str]:
    """ "<file>: <what>" for every gateway log or capture (mitmproxy's or HAR) under `directory` holding a remembered
    secret or a JWT."""
    found = []
    outputs = [*directory.rglob("gateway.log"), *directory.rglob("*.flows"), *directory.rglob("*.har")]
    for path in sorted(outputs):
        text = path.read_bytes().decode("latin-1")
        found += [f"{path}: a secret remembered by the tests" for s in _remembered if s in text][:1]
        # A HAR holds binary bodies (layers) in base64, where a JWT's start comes by chance.
        if JWT_START in text and path.suffix != ".har":
            found.append(f"{path}: a JWT")
    return found


def forms(secret: str) -> set[bytes]:
    """How a secret could stand in a capture, a page or a log: as text, URL-encoded, JSON-escaped, and base64 at any
    of the three alignments it could have inside a longer encoded value."""
    data = secret.encode()
    found = {data, quote(secret, safe="").encode(), json.dumps(secret)[1:-1].encode()}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data)
        # the characters that encode only the secret's own bytes
        core = encoded[(offset * 4 + 2) // 3 : (len(data) + offset) // 3 * 4]
        if len(core) >= 8:
            found.add(core)
    return found
