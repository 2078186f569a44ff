"""mitmproxy's own log lines hold no secret a URL carries: a client's bad request line (`GET http://user:password@host/`,
`GET /token?access_token=...`) is quoted whole in mitmproxy's protocol error, at any verbosity. A filter on each log
handler redacts URL userinfo and secret query fields as scrub.py does in the lines of mitmproxy's loggers (ocigate's
own say no secret to begin with)."""

import logging

from . import scrub

# The most of one of mitmproxy's log messages kept: it quotes a client's request line whole, and mitmproxy sets no
# limit to one. A line a person reads needs no more; what is cut is said.
MAX_MESSAGE = 16 * 1024
# Set on a record once scrubbed: every handler of the root logger has the filter, and each handler runs it.
_SCRUBBED = "ocigate_scrubbed"


class UrlSecretsFilter(logging.Filter):
    """Redacts the userinfo and the secret query fields of every URL in a record of mitmproxy's loggers, before any
    handler formats it: its message, and the traceback or stack it carries (an addon error's last line repeats the
    exception's text), written into the message since mitmproxy's formatter would format them unscrubbed. It never
    raises (an exception in a filter escapes the logging call, into mitmproxy's hook), and a record it cannot read
    loses its arguments rather than have logging print them raw."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SCRUBBED, False):
            return True  # by the filter of another handler: once is enough, and a message cut is not cut again
        if record.name == "mitmproxy" or record.name.startswith("mitmproxy."):
            setattr(record, _SCRUBBED, True)
            record.msg, record.args = _scrubbed(record), None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _scrubbed(record: logging.LogRecord) -> str:
    """The record's whole text, redacted, then cut at MAX_MESSAGE (cut first, a URL's userinfo would lose its `@`
    and pass whole)."""
    try:
        try:
            text = record.getMessage()
        except Exception:
            # Arguments that do not fit the format: logging's handleError would print the format and the arguments
            # raw to stderr. What is left is the format alone.
            text = f"{record.msg} (its arguments could not be formatted)"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        elif record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        redacted = scrub.text_urls(text)
    except Exception:
        return "a log message of mitmproxy's that ocigate could not look for secrets in, not shown"
    cut = len(redacted) - MAX_MESSAGE
    return redacted if cut <= 0 else f"{redacted[:MAX_MESSAGE]}... ({cut} characters more not shown)"


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
