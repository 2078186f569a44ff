"""An answer in the distribution spec's error format, as ocigate gives one when it answers a client itself."""

import json
from dataclasses import dataclass

from mitmproxy.net.http.status_codes import RESPONSES

# A reason phrase carries the message up to this many characters.
_MAX_REASON = 2000


@dataclass(frozen=True)
class OciError:
    """`{"errors": [{"code": ..., "message": ...}]}` under `status`."""

    status: int
    code: str  # the spec's error code: MANIFEST_UNKNOWN, UNAUTHORIZED, UNAVAILABLE...
    message: str  # what failed and, where hosts were asked, every host and why

    def body(self) -> bytes:
        return json.dumps({"errors": [{"code": self.code, "message": self.message}]}).encode()

    def reason(self) -> str:
        """The status line's reason phrase, with the message after the standard one: Go clients built on
        distribution's client code (docker, skopeo, podman) show a 5xx answer's status line and never its body, and a
        HEAD answer has no body at all."""
        standard = RESPONSES.get(self.status, "Error")
        # A reason phrase is visible ASCII and spaces only (RFC 9112 4): anything else would break the status line.
        shown = "".join(c if " " <= c <= "~" else "?" for c in self.message)[:_MAX_REASON]
        return f"{standard}: {shown}" if shown else standard
