"""mitmproxy's own log lines hold no secret a URL carries: a client's bad request line (`GET http://user:password@host/`,
`GET /token?access_token=...`) is quoted whole in mitmproxy's protocol error, at any verbosity. A filter on each log
handler redacts URL userinfo and secret query fields as scrub.py does in the lines of mitmproxy's loggers (ocigate's
own say no secret to begin with)."""

import logging

from . import scrub


class UrlSecretsFilter(logging.Filter):
    """Redacts the userinfo and the secret query fields of every URL in a record of mitmproxy's loggers, before any
    handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "mitmproxy" or record.name.startswith("mitmproxy."):
            try:
                message = record.getMessage()
            except Exception:
                # Arguments that do not fit the format: logging's handleError would print the format and the
                # arguments raw to stderr. What is left is the format alone, redacted.
                record.msg, record.args = f"{_redacted_format(record)} (its arguments could not be formatted)", None
                return True
            redacted = scrub.text_urls(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def _redacted_format(record: logging.LogRecord) -> str:
    try:
        return scrub.text_urls(str(record.msg))
    except Exception:
        return "a log message that could not be shown"


class ScrubbedLogs:
    """Puts the filter on every handler of the root logger, where mitmproxy's handlers (terminal, mitmweb's event
    list, the error check) are, once they are all there; takes it off when the gateway ends."""

    def __init__(self) -> None:
        self.filter = UrlSecretsFilter()

    def running(self) -> None:
        for handler in logging.getLogger().handlers:
            if self.filter not in handler.filters:
                handler.addFilter(self.filter)

    def done(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self.filter)
