"""The access log: one JSON object a line for each request the gateway handled, built from its flow record (which
holds no secret), and written by a thread of its own, so that no hook waits for a disk.
"""

import json
import queue
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from .metrics import reason
from .record import FlowRecord
from .settings import STDERR

# Tells the writer thread to flush and end.
_END = None


def reference(record: FlowRecord) -> str | None:
    """What the request named upstream: `upstream/repository:tag`, `upstream/repository@digest`, or
    `upstream/repository` for a request naming no tag or digest; None for one naming no repository."""
    if record.repository is None:
        return None
    named = f"{record.upstream}/{record.repository}"
    if record.reference is None:
        return named
    # A tag has no colon; a digest always has one (algorithm:hex).
    return f"{named}{'@' if ':' in record.reference else ':'}{record.reference}"


def entry(record: FlowRecord, started: float) -> dict[str, Any]:
    """The access log's object for a request that ended, whose request came at `started` (seconds since the epoch).
    Every key is always there (null when it does not apply), so that the lines can be read as a table."""
    return {
        "time": datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "client": record.client,
        "proxy_user": record.proxy_user,
        "upstream": record.upstream,
        "reference": reference(record),
        "named_reference": record.named_reference,
        "method": record.method,
        "kind": record.route,
        "hosts": [
            {
                "host": outcome.host,
                "result": outcome.result,
                "skipped": outcome.fell_through,
                "reason": reason(outcome).value if outcome.fell_through else None,
            }
            for outcome in record.attempts
        ],
        "served_by": record.served_by,
        "ns": record.ns,
        "status": record.status,
        "bytes": record.bytes_sent,
        "ms": round(record.duration * 1000) if record.duration is not None else None,
        "credential": record.credential,
        "token": record.token,
        "verified": record.verified,
        "unchecked": record.unchecked,
        "error": record.error,
        "policy": record.policy,
    }


def line(record: FlowRecord, started: float) -> str:
    """The entry as one line: JSON escapes every line break a value may hold."""
    return json.dumps(entry(record, started), separators=(",", ":")) + "\n"


class AccessLog:
    """Lines handed over by the event loop (never waiting) and written by one thread, which flushes whenever it has
    caught up; closing writes every line handed over before."""

    def __init__(self, stream: TextIO, *, owned: bool) -> None:
        self._stream = stream
        self._owned = owned  # a file the log opened, closed with it (standard error is not)
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_lines, name="ocigate-access-log", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, target: Path | Literal["-"]) -> "AccessLog":
        """The log appended to `target`, or written to standard error; OSError when the file cannot be opened."""
        if target == STDERR:
            return cls(sys.stderr, owned=False)
        return cls(open(target, "a", encoding="utf-8"), owned=True)

    def write(self, text: str) -> None:
        self._lines.put(text)

    def close(self) -> None:
        """Writes what is left and closes the file (waiting for the disk: only when the log is replaced or the gateway
        ends)."""
        self._lines.put(_END)
        self._writer.join()
        if self._owned:
            self._stream.close()

    def _write_lines(self) -> None:
        while True:
            text = self._lines.get()
            while text is not _END:
                try:
                    self._stream.write(text)
                except OSError as e:
                    # A full disk loses lines, never the gateway's flows: said once for each line lost.
                    print(f"ocigate: access log: cannot write: {e}", file=sys.stderr)
                try:
                    text = self._lines.get_nowait()
                except queue.Empty:
                    break
            try:
                self._stream.flush()
            except OSError as e:
                print(f"ocigate: access log: cannot write: {e}", file=sys.stderr)
            if text is _END:
                return
