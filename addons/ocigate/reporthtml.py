"""The HTML form of an `ocigate report` (report.py): one page that needs nothing else (inline style and SVG, no
script, nothing fetched), with a waterfall of each pull's requests per host. Everything taken from the capture is
escaped: a hostile capture cannot put markup into the page."""

import html
import math
from dataclasses import dataclass

from .record import GATEWAY
from .report import (
    MAX_NOTES,
    MAX_OTHERS,
    Pull,
    Report,
    Request,
    human_size,
    human_time,
    outcome,
    summary_lines,
    totals,
)

MAX_WATERFALL_ROWS = 400


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
.failed { color: #b00020; font-weight: 600; } .num { text-align: right; white-space: nowrap; }
code { font: 12px ui-monospace, monospace; } ul.summary li { margin: 2px 0; }
svg.waterfall { font: 11px ui-monospace, monospace; background: #fff; border: 1px solid #ddd; }
.hint { color: #666; font-size: .9em; } .legend span { display: inline-block; margin-right: 1.5em; }
.swatch { display: inline-block; width: 1em; height: .8em; vertical-align: middle; margin-right: .3em; }
"""
_SERVED = "#3b78c3"
_SERVED_FAILED = "#e08a00"
_FAILED = "#c62828"
_GATEWAY = "#7a7a7a"
_RED = f' fill="{_FAILED}"'


def _hatch(pattern: str) -> str:
    """The red hatching of a failed attempt, as a pattern with the id `pattern` (one per SVG: ids are the page's)."""
    return (
        f'<defs><pattern id="{pattern}" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f6c9c9"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{_FAILED}" stroke-width="3"/></pattern></defs>'
    )


# Failed attempts have no time of their own in ocigate's record, only the request they were part of.
_HINT = (
    "<p class=hint>Each bar spans its whole request; a host that did not serve it was asked within that time, "
    "before the host that served.</p>"
)
_ROW = 18
_LABEL_WIDTH = 330
_PLOT_WIDTH = 640
_AXIS = 24


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ticks(span: float) -> list[float]:
    """Nice times (1, 2 or 5 times a power of ten, in seconds) for about eight ticks over `span` seconds."""
    raw = span / 8
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(span / step) + 1)]


@dataclass(frozen=True)
class _Bar:
    request: Request
    host: str
    role: str  # "served", "served-failed", "failed", "gateway"
    result: str


def _bars(pull: Pull) -> list[tuple[str, list[_Bar]]]:
    """The waterfall's lanes: each host in the order first asked, with a bar for every request it was asked for."""
    lanes: dict[str, list[_Bar]] = {}
    for request in pull.requests:
        results = {a.host: a.result for a in request.attempts}
        for host in request.hosts:
            if host == request.served_by:
                role = "served-failed" if request.failed else "gateway" if host == GATEWAY else "served"
                result = str(request.status) if request.status is not None else "?"
            else:
                role, result = "failed", results.get(host, "?")
            lanes.setdefault(host, []).append(_Bar(request, host, role, result))
    return list(lanes.items())


def _fill(role: str, pattern: str) -> str:
    return {
        "served": _SERVED,
        "served-failed": _SERVED_FAILED,
        "failed": f"url(#{pattern})",
        "gateway": _GATEWAY,
    }[role]


def waterfall(pull: Pull, number: int = 1) -> str:
    """An SVG timeline of `pull`: a lane per host, a row per request it was asked for, from the request's start to
    its end; a host that did not serve a request it was asked for is hatched red with what it answered."""
    pattern = f"failed-hatch-{number}"
    start = pull.start
    span = max(pull.seconds or 0.0, 0.001)
    lanes = _bars(pull)
    parts: list[str] = []
    y = _AXIS
    rows = 0
    left_out = 0
    for host, bars in lanes:
        served = sum(1 for b in bars if b.role in ("served", "gateway"))
        failed = sum(1 for b in bars if b.role == "failed")
        heading = f"{host}: served {served}" + (f", did not serve {failed}" if failed else "")
        parts.append(
            f'<rect x="0" y="{y}" width="{_LABEL_WIDTH + _PLOT_WIDTH + 20}" height="{_ROW}" fill="#eef2f7"/>'
            f'<text x="4" y="{y + 13}" font-weight="bold"{_RED if failed else ""}>{_e(heading)}</text>'
        )
        y += _ROW
        for bar in bars:
            if rows >= MAX_WATERFALL_ROWS:
                left_out += 1
                continue
            rows += 1
            request = bar.request
            label = f"{request.describe()}"
            tip = f"{request.describe()} at {bar.host}: {bar.result}"
            if request.error:
                tip += f" ({request.error})"
            tip += f", {human_time(request.seconds)}, {human_size(request.size)}, flow {request.number}"
            if request.start is not None and start is not None:
                x = _LABEL_WIDTH + (request.start - start) / span * _PLOT_WIDTH
                width = max((request.seconds or 0.0) / span * _PLOT_WIDTH, 2.0)
            else:
                x, width = float(_LABEL_WIDTH), 2.0
                tip += " (no time recorded)"
            stroke = f' stroke="{_FAILED}" stroke-width="1.5"' if bar.role == "failed" else ""
            parts.append(
                f'<g class="bar {bar.role}"><title>{_e(tip)}</title>'
                f'<text x="14" y="{y + 13}">{_e(label[:48])}</text>'
                f'<rect x="{x:.1f}" y="{y + 3}" width="{width:.1f}" height="{_ROW - 6}" '
                f'fill="{_fill(bar.role, pattern)}"{stroke}/>'
                f'<text x="{x + width + 4:.1f}" y="{y + 13}"{_RED if bar.role == "failed" else ""}>'
                f"{_e(bar.result[:40])}</text></g>"
            )
            y += _ROW
    if left_out:
        parts.append(f'<text x="4" y="{y + 13}">… {left_out} more rows left out</text>')
        y += _ROW
    axis = [f'<line x1="{_LABEL_WIDTH}" y1="{_AXIS - 4}" x2="{_LABEL_WIDTH}" y2="{y}" stroke="#999"/>']
    for tick in _ticks(span):
        x = _LABEL_WIDTH + tick / span * _PLOT_WIDTH
        axis.append(
            f'<line x1="{x:.1f}" y1="{_AXIS - 4}" x2="{x:.1f}" y2="{y}" stroke="#e4e4e4"/>'
            f'<text x="{x:.1f}" y="{_AXIS - 8}" text-anchor="middle">{_e(human_time(tick))}</text>'
        )
    width = _LABEL_WIDTH + _PLOT_WIDTH + 160
    return (
        f'<svg class="waterfall" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 6}" '
        f'viewBox="0 0 {width} {y + 6}" role="img" aria-label="{_e("timeline of " + pull.name)}">'
        f"{_hatch(pattern)}{''.join(axis)}{''.join(parts)}</svg>"
    )


def _legend() -> str:
    items = [
        (_SERVED, "served"),
        (_SERVED_FAILED, "served an error"),
        ("#f6c9c9", "asked, did not serve (failed attempt)"),
        (_GATEWAY, "answered by the gateway"),
    ]
    spans = "".join(
        f'<span><i class="swatch" style="background:{color}"></i>{_e(text)}</span>' for color, text in items
    )
    return f'<p class="legend">{spans}</p>'


def _html_pull(pull: Pull, number: int) -> str:
    summary = "".join(
        f"<li{' class=failed' if line.startswith(('error:', 'fallback:')) else ''}>{_e(line)}</li>"
        for line in summary_lines(pull)
    )
    rows = []
    start = pull.start
    for r in pull.requests:
        at = f"+{r.start - start:.3f} s" if r.start is not None and start is not None else "?"
        tried = "; ".join(f"{a.host}: {a.result}" for a in r.attempts if a.host != r.served_by)
        css = ' class="failed"' if r.failed else ""
        rows.append(
            f"<tr{css}><td class=num>{_e(at)}</td><td class=num>{_e(human_time(r.seconds))}</td>"
            f"<td><code>{_e(r.describe())}</code></td><td>{_e(r.served_by or '?')}</td><td>{_e(outcome(r))}</td>"
            f"<td class=num>{_e(human_size(r.size))}</td><td>{_e(tried)}</td></tr>"
        )
    return (
        f"<section><h2>Pull {_e(pull.name)}</h2><ul class=summary>{summary}</ul>{waterfall(pull, number)}{_HINT}"
        f"<details><summary>{len(pull.requests)} requests</summary><table><tr><th>start</th><th>time</th>"
        "<th>request</th><th>served by</th><th>answer</th><th>size</th><th>did not serve</th></tr>"
        f"{''.join(rows)}</table></details></section>"
    )


def as_html(report: Report) -> str:
    """The report as one HTML page that needs nothing else: inline style and SVG, no script, nothing fetched."""
    title = f"ocigate report of {report.source}"
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p>{_e(totals(report))}.</p>",
        _legend(),
        *(_html_pull(pull, number) for number, pull in enumerate(report.pulls, 1)),
    ]
    if report.others:
        rows = [
            f"<tr><td>{_e(o.method)}</td><td>{_e(o.host)}</td><td><code>{_e(o.path)}</code></td>"
            f"<td>{_e(o.status if o.status is not None else o.error or '?')}</td>"
            f"<td class=num>{_e(human_size(o.size))}</td><td>{'token request' if o.token_request else ''}</td></tr>"
            for o in report.others[:MAX_OTHERS]
        ]
        more = len(report.others) - MAX_OTHERS
        body.append(
            "<h2>Flows without ocigate's record</h2><table><tr><th>method</th><th>host</th><th>path</th>"
            f"<th>answer</th><th>size</th><th></th></tr>{''.join(rows)}</table>"
            + (f"<p>… and {more} more flows</p>" if more > 0 else "")
        )
    if report.notes:
        notes = "".join(f"<li>{_e(note)}</li>" for note in report.notes[:MAX_NOTES])
        more = len(report.notes) - MAX_NOTES
        body.append(f"<h2>Notes</h2><ul>{notes}</ul>" + (f"<p>… and {more} more notes</p>" if more > 0 else ""))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        # Nothing may load or run, whatever a capture managed to put into the page.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        'img-src data:">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
