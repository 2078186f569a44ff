"""The access log: one JSON object a line for each request the gateway handled, built from its flow record (which
holds no secret), and written by a thread of its own, so that no hook waits for a disk.

At most MAX_QUEUED lines wait for the writer: a disk slower than the requests loses lines (counted, and said in one
log line per REPORT_EVERY seconds) rather than the gateway's memory. A log file moved or removed (by logrotate) is
opened again at its path before the next lines are written, as logging's WatchedFileHandler does.

Each line is written by one write(2) to a file opened O_APPEND: the workers of `ocigate --workers N` append to one
file, and their lines never mix. On standard error (a pipe, the journal) that holds only for writes up to PIPE_BUF
(4 KiB): a longer line is shortened there (see fit_pipe), while a file keeps it whole.
"""

import json
import logging
import math
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from .metrics import reason
from .record import FlowRecord
from .settings import STDERR

log = logging.getLogger("ocigate")

# Tells the writer thread to flush and end.
_END = None
# Lines waiting for the writer at most: some seconds of a busy gateway's requests, a few MiB.
MAX_QUEUED = 10_000
# How often at most the lines dropped are said in the log.
REPORT_EVERY = 60.0
# The longest write to a pipe that the kernel never mixes with another process's writes to it.
PIPE_BUF = select.PIPE_BUF
# Ends a value cut short to fit a line in PIPE_BUF: ASCII, so that JSON keeps it as it is.
CUT_MARK = "...[cut]"


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


def entry(record: FlowRecord, started: float, worker: int | None = None) -> dict[str, Any]:
    """The access log's object for a request that ended, whose request came at `started` (seconds since the epoch),
    served by `worker` of `ocigate --workers N` (None: a gateway alone). Every key is always there (null when it does
    not apply), so that the lines can be read as a table."""
    return {
        "time": datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "worker": worker,
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


def line(record: FlowRecord, started: float, worker: int | None = None) -> str:
    """The entry as one line: JSON escapes every line break a value may hold."""
    return _dumps(entry(record, started, worker)) + "\n"


def fit_pipe(text: str, limit: int = PIPE_BUF) -> str:
    """The line `text` (newline included) in at most `limit` bytes, to go to a pipe in one write that no other
    worker's line can cut into: whichever value is largest goes first, a string cut short (ending with CUT_MARK), a
    list emptied, until it fits, each value cut named in "cut". Still one JSON object."""
    if len(text.encode()) <= limit:
        return text
    fields: dict[str, Any] = json.loads(text)
    cut: list[str] = []

    def size() -> int:
        return len(_dumps(fields | {"cut": cut}).encode()) + 1  # and its newline

    def saving(name: str) -> int:
        value = fields[name]
        if isinstance(value, str):
            return len(value.encode()) - len(CUT_MARK) if len(value) > len(CUT_MARK) else 0
        return len(_dumps({"v": value}).encode()) - len('{"v":[]}') if isinstance(value, list) else 0

    while size() > limit:
        name = max(fields, key=saving)
        value = fields[name]
        if saving(name) <= 0:
            break  # nothing left to cut: written whole, in more than one write
        if isinstance(value, str):
            keep = max(0, len(value) - (size() - limit) - len(CUT_MARK))
            fields[name] = value[:keep] + CUT_MARK
        else:
            fields[name] = []
        if name not in cut:
            cut.append(name)
    return _dumps(fields | {"cut": cut}) + "\n"


def _dumps(fields: dict[str, Any]) -> str:
    return json.dumps(fields, separators=(",", ":"))


class AccessLog:
    """Lines handed over by the event loop (never waiting) and written by one thread, each as soon as it can; closing
    writes every line handed over before."""

    def __init__(
        self,
        fd: int,
        *,
        path: Path | None = None,
        capacity: int = MAX_QUEUED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fd = fd
        self._path = path  # the file the log opened (and reopens), closed with it; None: standard error
        self._lines: queue.Queue[str | None] = queue.Queue(capacity)
        self._clock = clock
        self._dropped = 0  # lines dropped and not yet said in the log (read and written on the event loop only)
        self._reported_at = -math.inf
        self._writer = threading.Thread(target=self._write_lines, name="ocigate-access-log", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, target: Path | Literal["-"]) -> "AccessLog":
        """The log appended to `target`, or written to standard error; OSError when the file cannot be opened."""
        if target == STDERR:
            return cls(sys.stderr.fileno())
        return cls(_open_appending(target), path=target)

    def write(self, text: str) -> bool:
        """Hands a line to the writer; False when it was dropped, the writer being MAX_QUEUED lines behind."""
        try:
            self._lines.put_nowait(text)
            written = True
        except queue.Full:
            self._dropped += 1
            written = False
        if self._dropped and self._clock() - self._reported_at >= REPORT_EVERY:
            self._report()
        return written

    def close(self) -> None:
        """Writes what is left and closes the file (waiting for the disk: only when the log is replaced or the gateway
        ends)."""
        self._lines.put(_END)
        self._writer.join()
        if self._dropped:
            self._report()
        if self._path is not None:
            os.close(self._fd)

    def _report(self) -> None:
        log.warning(
            "ocigate: access log: %d lines dropped: it was written more slowly than requests ended", self._dropped
        )
        self._dropped = 0
        self._reported_at = self._clock()

    def _write_lines(self) -> None:
        while True:
            text = self._lines.get()
            # Once each time the writer wakes, not for every line: two stat calls a line would be most of its work.
            self._reopen_if_moved()
            while text is not _END:
                try:
                    if self._path is None:
                        text = fit_pipe(text)
                    self._write_line(text.encode())
                except (OSError, ValueError) as e:
                    # A full disk (or a line that is no JSON) loses lines, never the gateway's flows or its writer:
                    # said once for each line lost.
                    print(f"ocigate: access log: cannot write: {e}", file=sys.stderr)
                try:
                    text = self._lines.get_nowait()
                except queue.Empty:
                    break
            if text is _END:
                return

    def _write_line(self, data: bytes) -> None:
        # A regular file takes it in one write; what is left after a short one (a pipe) follows.
        while data:
            data = data[os.write(self._fd, data) :]

    def _reopen_if_moved(self) -> None:
        """The file at the log's path again, when the one written to was moved or removed (logrotate)."""
        if self._path is None:
            return
        try:
            at_path = os.stat(self._path)
        except FileNotFoundError:
            at_path = None
        try:
            written = os.fstat(self._fd)
            if at_path is not None and (at_path.st_dev, at_path.st_ino) == (written.st_dev, written.st_ino):
                return
            reopened = _open_appending(self._path)
        except OSError as e:
            print(f"ocigate: access log: cannot open {self._path} again: {e}", file=sys.stderr)
            return
        moved, self._fd = self._fd, reopened
        os.close(moved)


def _open_appending(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
