"""`ocigate report CAPTURE`: what a saved capture (`-w`, `save_stream_file`) says about each image pull, for a
person reading a bug report: the requests, the hosts asked and which served, the fallbacks and why, bytes, time,
errors and token fetches; as text, or as one self-contained HTML page with a waterfall of each pull per host.

A capture is someone else's file: nothing in it is trusted. Every string taken from it is redacted again (a capture
made before ocigate redacted everything may still hold a secret) and made printable, and every value of ocigate's
record is checked for its type: an odd one becomes a note, never a crash. The HTML escapes everything and loads
nothing (no script, no external resource).
"""

import argparse
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import exceptions, http
from mitmproxy.io import FlowReader

from . import scrub
from .files import NotRegularFileError, check_regular
from .record import GATEWAY, METADATA_KEY

REDACTED = "<redacted>"
# A hostile or broken capture may hold strings of any length: a report shows the start of each.
MAX_SHOWN = 300
# Past these, a report says how many more there were instead of showing them.
MAX_NOTES = 30
MAX_OTHERS = 40

# --- Redaction: what may remain of a secret in a capture made before (or without) ocigate's own redaction.

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")
_SCHEME_CREDENTIAL = re.compile(r"(?i)\b(Bearer|Basic)\s+(?!<redacted>)[A-Za-z0-9._~+/=-]+")
_SECRET_NAMES = "|".join(re.escape(name) for name in sorted(scrub.SECRET_FIELDS))
_JSON_SECRET = re.compile(rf'(?i)("(?:{_SECRET_NAMES})"\s*:\s*)"(?:[^"\\]|\\.)*"')
_FORM_SECRET = re.compile(rf"(?i)\b({_SECRET_NAMES})=[^&\s;#]*")
_HEADER_SECRET = re.compile(r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie)(\s*[:=]\s*)[^\r\n;,]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """`text` with anything that looks like a credential replaced: URL userinfo, `Bearer`/`Basic` values, JSON and
    form fields named like secrets, credential header lines, JWTs."""
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _HEADER_SECRET.sub(rf"\1\2{REDACTED}", text)
    text = _SCHEME_CREDENTIAL.sub(rf"\1 {REDACTED}", text)
    text = _JSON_SECRET.sub(rf'\1"{REDACTED}"', text)
    text = _FORM_SECRET.sub(rf"\1={REDACTED}", text)
    return _JWT.sub(REDACTED, text)


def shown(text: str) -> str:
    """A string from the capture as a report may show it: redacted, one line of printable characters (no terminal
    escape can reach the reader's terminal), and not too long."""
    text = redact(text)
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else "?" for c in text)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


# --- The report: typed records of what the capture holds.


@dataclass(frozen=True)
class HostAttempt:
    """One host asked for a request, as ocigate recorded it."""

    host: str
    result: str  # "200", "500", "connection refused", ...
    fell_through: bool  # the next host was asked instead
    token: str | None = None  # "fetched" or "cached"


@dataclass(frozen=True)
class Request:
    """A flow ocigate handled."""

    number: int  # the flow's place in the capture, from 1
    method: str
    kind: str  # the route's kind: manifest, blob, ping, ...
    target: str  # the path the client asked for
    reference: str | None
    attempts: tuple[HostAttempt, ...]
    served_by: str | None  # the host's URL, GATEWAY, or None when the record does not say
    status: int | None
    error: str | None
    start: float | None  # seconds since the epoch
    end: float | None
    size: int | None  # bytes of the answer's body
    token: str | None  # the token of the host that served: "fetched" or "cached"
    credential: str | None  # the credential ocigate presented to it, by source and user
    verified: bool  # its bytes were checked against a digest
    unchecked: str | None  # why they were not

    @property
    def seconds(self) -> float | None:
        return self.end - self.start if self.start is not None and self.end is not None else None

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.status is not None and self.status >= 400)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host involved, in the order asked: those tried, then the one that served (or the gateway)."""
        hosts = list(dict.fromkeys(a.host for a in self.attempts))
        if self.served_by is not None and self.served_by not in hosts:
            hosts.append(self.served_by)
        return tuple(hosts)

    @property
    def tokens(self) -> tuple[str, ...]:
        """Each token ocigate used for it, "fetched" or "cached": per host asked, and the serving host's when the
        attempts do not say (a streamed blob's host may not have been asked before)."""
        tokens = [a.token for a in self.attempts if a.token is not None]
        if self.token is not None and not any(a.host == self.served_by and a.token for a in self.attempts):
            tokens.append(self.token)
        return tuple(tokens)

    def describe(self) -> str:
        what = f"{self.method} {self.kind}"
        return f"{what} {short_reference(self.reference)}" if self.reference else f"{what} {self.target}"


@dataclass(frozen=True)
class HostSummary:
    host: str
    asked: int  # requests that asked it (or that the gateway answered, for GATEWAY)
    served: int
    failures: tuple[tuple[str, int], ...]  # why it did not serve, and how often


@dataclass(frozen=True)
class Fallback:
    """Requests that fell through `host` (answering `result`) and were served by `served_by`."""

    host: str
    result: str
    served_by: str
    count: int


@dataclass(frozen=True)
class Pull:
    """The requests of one image pull: those whose named reference (OCI-Named-Ref) is `name`."""

    name: str
    requests: tuple[Request, ...]

    @property
    def start(self) -> float | None:
        return min((r.start for r in self.requests if r.start is not None), default=None)

    @property
    def end(self) -> float | None:
        return max((r.end for r in self.requests if r.end is not None), default=None)

    @property
    def seconds(self) -> float | None:
        start, end = self.start, self.end
        return end - start if start is not None and end is not None else None

    @property
    def size(self) -> int:
        return sum(r.size or 0 for r in self.requests)

    @property
    def failed(self) -> tuple[Request, ...]:
        return tuple(r for r in self.requests if r.failed)

    @property
    def credentials(self) -> Counter[str]:
        return Counter(r.credential for r in self.requests if r.credential is not None)

    @property
    def checks(self) -> Counter[str]:
        """How many answers were verified against their digest, and why the others passed unchecked."""
        return Counter(
            "verified" if r.verified else f"unchecked ({r.unchecked})"
            for r in self.requests
            if r.verified or r.unchecked
        )

    @property
    def tokens(self) -> Counter[str]:
        return Counter(token for r in self.requests for token in r.tokens)

    @property
    def kinds(self) -> Counter[str]:
        return Counter(r.kind for r in self.requests)

    @property
    def hosts(self) -> tuple[HostSummary, ...]:
        order: dict[str, None] = {}
        asked: Counter[str] = Counter()
        served: Counter[str] = Counter()
        failures: dict[str, Counter[str]] = {}
        for request in self.requests:
            for host in request.hosts:
                order.setdefault(host)
                asked[host] += 1
            if request.served_by is not None and not request.failed:
                served[request.served_by] += 1
            for attempt in request.attempts:
                if attempt.host != request.served_by:
                    failures.setdefault(attempt.host, Counter())[attempt.result] += 1
        return tuple(
            HostSummary(host, asked[host], served[host], tuple(failures.get(host, Counter()).most_common()))
            for host in order
        )

    @property
    def fallbacks(self) -> tuple[Fallback, ...]:
        counted: Counter[tuple[str, str, str]] = Counter()
        for request in self.requests:
            for attempt in request.attempts:
                # A fallback ends at a host that served; when none did, the request is an error instead.
                served = request.served_by not in (None, GATEWAY)
                if served and attempt.fell_through and attempt.host != request.served_by:
                    counted[(attempt.host, attempt.result, request.served_by or "")] += 1
        return tuple(Fallback(host, result, by, n) for (host, result, by), n in counted.items())


@dataclass(frozen=True)
class OtherFlow:
    """A flow without ocigate's record: a host without rules, a token endpoint, a path outside the API."""

    number: int
    method: str
    host: str
    path: str  # without the query, which may carry anything
    status: int | None
    error: str | None
    size: int | None

    @property
    def token_request(self) -> bool:
        """A client's own token request (under `authentication = "client"`, or a realm ocigate does not rule)."""
        return "token" in self.path.lower() or "oauth" in self.path.lower()


@dataclass(frozen=True)
class Report:
    source: str  # the capture's name, as given
    pulls: tuple[Pull, ...]
    others: tuple[OtherFlow, ...]
    notes: tuple[str, ...]  # what could not be read as expected

    @property
    def requests(self) -> int:
        return sum(len(p.requests) for p in self.pulls)


# --- From flows to the report.


class _Fields:
    """The values of one flow's ocigate record, each checked for its type; a value of the wrong type is None and a
    note."""

    def __init__(self, raw: Mapping[Any, Any], where: str, notes: list[str]) -> None:
        self.raw = raw
        self.where = where
        self.notes = notes

    def _odd(self, name: str, value: object, wanted: str) -> None:
        self.notes.append(f"{self.where}: {name!r} is {type(value).__name__}, not {wanted}; left out")

    def text(self, name: str) -> str | None:
        value = self.raw.get(name)
        if value is None or isinstance(value, str):
            return shown(value) if value else None
        self._odd(name, value, "text")
        return None

    def whole(self, name: str) -> int | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        self._odd(name, value, "a whole number of at least 0")
        return None

    def amount(self, name: str) -> float | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            return float(value)
        self._odd(name, value, "a number of at least 0")
        return None

    def attempts(self) -> tuple[HostAttempt, ...]:
        value = self.raw.get("attempts")
        if value is None:
            return ()
        if not isinstance(value, list):
            self._odd("attempts", value, "a list")
            return ()
        attempts = []
        for i, item in enumerate(value, 1):
            fields = _Fields(item, f"{self.where}, attempt {i}", self.notes) if isinstance(item, dict) else None
            host = fields.text("host") if fields else None
            result = fields.text("result") if fields else None
            fell_through = item.get("fell_through") if isinstance(item, dict) else None
            if fields is None or host is None or result is None or not isinstance(fell_through, bool):
                self.notes.append(f"{self.where}: attempt {i} is not a host, a result and whether it fell through")
                continue
            attempts.append(HostAttempt(host, result, fell_through, fields.text("token")))
        return tuple(attempts)


def _finite(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _timing(flow: http.HTTPFlow, ms: float | None) -> tuple[float | None, float | None]:
    """When the request started and ended: ocigate's own measure when it recorded one, else mitmproxy's timestamps
    (the answer's end, or the error's time)."""
    start = _finite(flow.request.timestamp_start)
    if start is not None and ms is not None:
        return start, start + ms / 1000
    ends = []
    if flow.response is not None:
        ends.append(_finite(flow.response.timestamp_end) or _finite(flow.response.timestamp_start))
    if flow.error is not None:
        ends.append(_finite(flow.error.timestamp))
    end = max((e for e in ends if e is not None), default=None)
    if start is None or end is None or end < start:
        return start, None
    return start, end


def _size(flow: http.HTTPFlow) -> int | None:
    """The answer's body size: what the capture holds of it, or what its Content-Length says when the body was
    streamed past mitmproxy and not kept."""
    response = flow.response
    if response is None:
        return None
    if flow.request.method == "HEAD" or response.status_code in (204, 304):
        return 0
    if response.raw_content:
        return len(response.raw_content)
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and len(declared) < 19:
        return int(declared)
    return 0 if response.raw_content is not None else None


def _where(number: int, flow: http.HTTPFlow) -> str:
    return f"flow {number} ({shown(flow.request.method)} {shown(flow.request.pretty_host)}{_path(flow)})"


def _path(flow: http.HTTPFlow) -> str:
    return shown(flow.request.path.partition("?")[0])


def _request(number: int, flow: http.HTTPFlow, fields: _Fields) -> Request:
    ms = fields.amount("ms")
    size = fields.whole("bytes")
    start, end = _timing(flow, ms)
    error = fields.text("error")
    if error is None and flow.error is not None:
        error = shown(flow.error.msg)
    status = fields.whole("status")
    if status is None and flow.response is not None and "status" not in fields.raw:
        status = flow.response.status_code
    return Request(
        number=number,
        method=fields.text("method") or shown(flow.request.method),
        kind=fields.text("route") or "unknown",
        target=_path(flow),
        reference=fields.text("reference"),
        attempts=fields.attempts(),
        served_by=fields.text("served_by"),
        status=status,
        error=error,
        start=start,
        end=end,
        size=size if size is not None else _size(flow),
        token=fields.text("token"),
        credential=fields.text("credential"),
        verified=fields.text("verified") is not None,
        unchecked=fields.text("unchecked"),
    )


def _pull_name(fields: _Fields) -> str:
    """The pull a request belongs to: the named reference the gateway added (a blob's is the tag it was pulled
    under); else what the request itself names."""
    named = fields.text("named_reference")
    if named:
        return named
    upstream = fields.text("upstream") or "(registry not recorded)"
    repository = fields.text("repository")
    if repository is None:
        return f"{upstream} (no image)"
    reference = fields.text("reference")
    if reference is None:
        return f"{upstream}/{repository}"
    return f"{upstream}/{repository}{'@' if ':' in reference else ':'}{reference}"


def _other(number: int, flow: http.HTTPFlow) -> OtherFlow:
    return OtherFlow(
        number=number,
        method=shown(flow.request.method),
        host=shown(flow.request.pretty_host),
        path=_path(flow),
        status=flow.response.status_code if flow.response is not None else None,
        error=shown(flow.error.msg) if flow.error is not None else None,
        size=_size(flow),
    )


def build(flows: Iterable[object], source: str) -> Report:
    """The report of `flows` (a capture's, in its order), read one at a time so a large capture is never held
    whole."""
    notes: list[str] = []
    pulls: dict[str, list[Request]] = {}
    others: list[OtherFlow] = []
    not_http: Counter[str] = Counter()
    for number, flow in enumerate(flows, 1):
        if not isinstance(flow, http.HTTPFlow):
            not_http[type(flow).__name__] += 1
            continue
        metadata = flow.metadata if isinstance(flow.metadata, dict) else {}
        raw = metadata.get(METADATA_KEY)
        if raw is None:
            others.append(_other(number, flow))
            continue
        if not isinstance(raw, dict):
            notes.append(
                f"{_where(number, flow)}: ocigate's record is {type(raw).__name__}, not a record; listed as a flow "
                "without one"
            )
            others.append(_other(number, flow))
            continue
        fields = _Fields(raw, _where(number, flow), notes)
        name = _pull_name(fields)
        pulls.setdefault(name, []).append(_request(number, flow, fields))
    for kind, n in not_http.items():
        notes.append(f"{_plural(n, 'flow')} of kind {kind} left out: not HTTP")
    if not pulls and others:
        notes.append(
            "no flow carries ocigate's record: was the capture made through ocigate (its -w or save_stream_file)?"
        )
    ordered = [
        Pull(name, tuple(sorted(requests, key=lambda r: (r.start is None, r.start or 0.0, r.number))))
        for name, requests in pulls.items()
    ]
    return Report(source, tuple(ordered), tuple(others), tuple(notes))


# --- Reading a capture.


class CaptureError(Exception):
    """The capture cannot be read; str() names the file and why."""


def _counted(flows: Iterable[object], read: list[int]) -> Iterator[object]:
    for flow in flows:
        read[0] += 1
        yield flow


def read_report(path: Path) -> Report:
    """The report of the capture at `path`; CaptureError names the file when it is missing, not a regular file,
    empty, or not (wholly) a mitmproxy capture."""
    try:
        with path.open("rb") as capture:
            check_regular(os.fstat(capture.fileno()).st_mode)
            if not capture.peek(1):
                raise CaptureError(f"{path}: the file is empty, not a mitmproxy capture")
            read = [0]
            try:
                return build(_counted(FlowReader(capture).stream(), read), str(path))
            except (exceptions.FlowReadException, ValueError, KeyError, TypeError, IndexError) as e:
                after = f" (after {read[0]} flows)" if read[0] else ""
                raise CaptureError(
                    f"{path}: not a mitmproxy capture{after}: {shown(str(e)) or type(e).__name__}"
                ) from e
    except NotRegularFileError as e:
        raise CaptureError(f"{path}: {e}") from e
    except OSError as e:
        raise CaptureError(f"{path}: cannot be read: {e.strerror or e}") from e


# --- Text.


def short_reference(reference: str) -> str:
    """A digest as a person compares them: its algorithm and first 12 hex digits."""
    algorithm, colon, encoded = reference.partition(":")
    return f"{algorithm}:{encoded[:12]}" if colon and len(encoded) > 12 else reference


def human_size(size: int | None) -> str:
    if size is None:
        return "?"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def human_time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.2g} ms"
    return f"{ms:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def outcome(request: Request) -> str:
    if request.error is not None:
        return f"{request.status or 'failed'}: {request.error}"
    return str(request.status) if request.status is not None else "no answer recorded"


def _limited(lines: Sequence[str], limit: int, what: str) -> list[str]:
    return [*lines[:limit], f"… and {len(lines) - limit} more {what}"] if len(lines) > limit else list(lines)


def tried(request: Request) -> str:
    """The hosts that did not serve `request`, and what each said."""
    tried = [f"{a.host}: {a.result}" for a in request.attempts if a.host != request.served_by]
    return f" (not served by {'; '.join(tried)})" if tried else ""


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def summary_lines(pull: Pull) -> list[str]:
    kinds = ", ".join(f"{n} {kind}" for kind, n in pull.kinds.most_common())
    lines = [
        f"{_plural(len(pull.requests), 'request')} ({kinds}), {human_size(pull.size)} in {human_time(pull.seconds)}, "
        f"{len(pull.failed)} failed"
    ]
    for host in pull.hosts:
        if host.host == GATEWAY:
            lines.append(f"the gateway answered {_plural(host.asked, 'request')} itself")
            continue
        why = "; ".join(f"{result} x{n}" for result, n in host.failures)
        lines.append(
            f"host {host.host}: asked {host.asked}, served {host.served}" + (f", did not serve: {why}" if why else "")
        )
    for fallback in pull.fallbacks:
        lines.append(
            f"fallback: {fallback.host} ({fallback.result}) -> {fallback.served_by}: "
            f"{_plural(fallback.count, 'request')}"
        )
    credentials = pull.credentials
    if credentials:
        lines.append("credentials: " + ", ".join(f"{name} x{n}" for name, n in credentials.most_common()))
    checks = pull.checks
    if checks:
        lines.append("digests: " + ", ".join(f"{n} {how}" for how, n in checks.most_common()))
    tokens = pull.tokens
    if tokens:
        lines.append("tokens: " + ", ".join(f"{n} {how}" for how, n in sorted(tokens.items())))
    for request in pull.failed:
        lines.append(f"error: {request.describe()}: {outcome(request)}{tried(request)}")
    return lines


def totals(report: Report) -> str:
    return (
        f"{_plural(len(report.pulls), 'pull')}, {_plural(report.requests, 'request')} handled by ocigate, "
        f"{_plural(len(report.others), 'other flow')}"
    )


def as_text(report: Report) -> str:
    """The report as plain text: a summary per pull, then its requests in time order, then the flows ocigate did
    not handle and the notes."""
    out = [f"ocigate report of {shown(report.source)}: {totals(report)}"]
    for pull in report.pulls:
        out += ["", f"Pull {pull.name}"]
        out += [f"  {line}" for line in summary_lines(pull)]
        out.append("  requests:")
        start = pull.start
        for request in pull.requests:
            at = f"+{request.start - start:7.3f}s" if request.start is not None and start is not None else " " * 9
            out.append(
                f"    {at} {human_time(request.seconds):>8} {request.describe()} -> {request.served_by or '?'} "
                f"{outcome(request)}, {human_size(request.size)}{tried(request)}"
            )
    if report.others:
        tokens = sum(1 for o in report.others if o.token_request)
        out += ["", f"Flows without ocigate's record: {len(report.others)} ({_plural(tokens, 'token request')})"]
        rows = [
            f"  {o.method} {o.host}{o.path} -> {o.status if o.status is not None else o.error or '?'}, "
            f"{human_size(o.size)}"
            for o in report.others
        ]
        out += _limited(rows, MAX_OTHERS, "flows")
    if report.notes:
        out += ["", "Notes:"]
        out += _limited([f"  {note}" for note in report.notes], MAX_NOTES, "notes")
    return "\n".join(out) + "\n"


# --- The command.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocigate report",
        description="Summarise a capture saved through ocigate (-w or save_stream_file) per image pull.",
    )
    parser.add_argument("capture", type=Path, help="the capture file")
    parser.add_argument("--html", metavar="FILE", type=Path, help="also write the report as one HTML page to FILE")
    return parser


def main(argv: Sequence[str]) -> int:
    """`argv` starts with the command: ["report", CAPTURE, ...]. Exit status: 0 reported, 1 the capture could not be
    read or the page not written, 2 usage error."""
    args = _parser().parse_args(argv[1:])
    try:
        report = read_report(args.capture)
    except CaptureError as e:
        print(f"ocigate report: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(as_text(report))
    if args.html is not None:
        from .reporthtml import as_html  # here: reporthtml builds on this module

        try:
            args.html.write_text(as_html(report), encoding="utf-8")
        except OSError as e:
            print(f"ocigate report: cannot write {args.html}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"ocigate report: wrote {args.html}")
    return 0
