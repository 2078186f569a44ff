"""mitmproxy's own log lines hold no URL userinfo: a client's bad request line (`GET http://user:password@host/`) is
quoted whole in mitmproxy's protocol error, at any verbosity. A filter on each log handler redacts it as scrub.py
does in the lines of mitmproxy's loggers (ocigate's own say no secret to begin with)."""

import logging

from . import scrub


class UserinfoFilter(logging.Filter):
    """Redacts the userinfo of every URL in a record of mitmproxy's loggers, before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "mitmproxy" or record.name.startswith("mitmproxy."):
            message = record.getMessage()
            redacted = scrub.text_userinfo(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


class ScrubbedLogs:
    """Puts the filter on every handler of the root logger, where mitmproxy's handlers (terminal, mitmweb's event
    list, the error check) are, once they are all there; takes it off when the gateway ends."""

    def __init__(self) -> None:
        self.filter = UserinfoFilter()

    def running(self) -> None:
        for handler in logging.getLogger().handlers:
            if self.filter not in handler.filters:
                handler.addFilter(self.filter)

    def done(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self.filter)
