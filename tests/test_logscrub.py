"""mitmproxy's own log lines hold no URL userinfo once the gateway runs (ScrubbedLogs)."""

import logging

from ocigate.logscrub import ScrubbedLogs


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_mitmproxys_lines_lose_url_userinfo_on_every_handler_while_the_gateway_runs() -> None:
    kept = _Kept()
    root = logging.getLogger()
    root.addHandler(kept)
    scrubbed = ScrubbedLogs()
    try:
        scrubbed.running()
        bad_line = "HTTP/1 protocol error: Bad HTTP request line: %r"
        logging.getLogger("mitmproxy.proxy.server").warning(bad_line, b"GET http://alice:pw-0123@h.test/ HTTP/1.1")
        logging.getLogger("mitmproxy").warning("token in http://tok-0123@h.test/v2/")
        logging.getLogger("someone.else").warning("http://bob:kept-0123@h.test/")  # not mitmproxy's: left alone
        scrubbed.done()
        logging.getLogger("mitmproxy.proxy.server").warning("after http://carol:pw-4567@h.test/")
    finally:
        root.removeHandler(kept)
    assert kept.lines == [
        "HTTP/1 protocol error: Bad HTTP request line: b'GET http://alice:<redacted>@h.test/ HTTP/1.1'",
        "token in http://<redacted>@h.test/v2/",
        "http://bob:kept-0123@h.test/",
        "after http://carol:pw-4567@h.test/",  # the filter is gone with the gateway
    ]
