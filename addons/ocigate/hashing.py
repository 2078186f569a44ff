"""Hashing a blob's bytes on a thread of its own, in order, while the event loop passes them on.

Hashing a blob in the event loop cost a fifth of the blob throughput (bench/pull.py): the loop that moves every
client's bytes also computed every sha256. hashlib lets go of the GIL while it hashes more than 2 KiB, so a thread
hashes on another core while the loop goes on moving bytes. The pieces of a large blob are handed over in batches:
each hand-off wakes the thread, which then needs the GIL for a moment. (A pool was tried first: its locks made a
hand-off cost as much as hashing 100 KiB.) The first MiBs of a blob are hashed in the loop: most blobs of most images
are small, and for them a thread would cost more than it saves.
"""

import hashlib
import threading
import weakref
from collections.abc import Callable
from queue import SimpleQueue

ALGORITHMS: dict[str, Callable[[], "hashlib._Hash"]] = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
# A blob's bytes up to here are hashed in the loop as they pass, holding nothing back.
IN_THE_LOOP = 2 * 1024 * 1024
# Bytes gathered, past that, before they go to the thread: what a blob streaming through holds beyond what mitmproxy
# itself does, with what the thread has yet to hash.
BATCH = 256 * 1024
# How far the thread may fall behind the bytes passed on. Past it the loop waits for the thread, so memory stays
# bounded when the thread cannot keep up (and the loop could not have hashed faster itself).
MAX_BEHIND = 8 * BATCH

# Blobs hashed on threads at once, at most: each holds up to BATCH + MAX_BEHIND bytes, and past as many threads as
# this the cores are taken anyway. Further blobs are hashed in the loop, as all were before.
MAX_THREADS = 32

Start = Callable[[Callable[[], None]], None]

_threads = threading.BoundedSemaphore(MAX_THREADS)


def _start_thread(run: Callable[[], None]) -> None:
    """Runs `run` on a thread of its own; RuntimeError when MAX_THREADS run already or no thread can be had."""
    if not _threads.acquire(blocking=False):
        raise RuntimeError("as many blobs are hashed on threads as may be")

    def running() -> None:
        try:
            run()
        finally:
            _threads.release()

    try:
        threading.Thread(target=running, name="ocigate-hash", daemon=True).start()
    except BaseException:
        _threads.release()
        raise


class _Worker:
    """The thread's side: it holds the hash and the queue, not the BackgroundHash, which can then be collected (and
    end the thread) when its flow is dropped mid-blob."""

    def __init__(self, hasher: "hashlib._Hash") -> None:
        self.hasher = hasher
        self.batches: SimpleQueue[list[bytes] | None] = SimpleQueue()
        self.room = threading.BoundedSemaphore(MAX_BEHIND // BATCH)  # batches the loop may hand over unhashed
        self.done = threading.Event()
        self.failed: BaseException | None = None

    def run(self) -> None:
        while (batch := self.batches.get()) is not None:
            if self.failed is None:
                try:
                    for piece in batch:
                        self.hasher.update(piece)
                except BaseException as e:  # told to the loop by hexdigest; the batches still go on being taken
                    self.failed = e
            self.room.release()
        self.done.set()

    def stop(self) -> None:
        self.batches.put(None)


class BackgroundHash:
    """A hash of pieces fed in order from the event loop (`update`), computed on a thread once the blob is longer than
    `IN_THE_LOOP`; `hexdigest` waits for the thread to catch up (at most `MAX_BEHIND` bytes) and hashes what is left
    itself. `close` ends the thread of a blob that is not finished (its flow failed)."""

    def __init__(self, algorithm: str, start: Start = _start_thread) -> None:
        self._hasher = ALGORITHMS[algorithm]()
        self._start = start
        self._gathered: list[bytes] = []
        self._gathered_size = 0
        self._size = 0
        self._worker: _Worker | None = None
        self._closed = False
        self._stopped: weakref.finalize[[], BackgroundHash] | None = None

    def update(self, piece: bytes) -> None:
        if self._closed:
            return  # the flow ended without its blob, or the gateway is stopping: nothing will be judged
        self._size += len(piece)
        if self._size <= IN_THE_LOOP:
            self._hasher.update(piece)
            return
        self._gathered.append(piece)
        self._gathered_size += len(piece)
        if self._gathered_size >= BATCH:
            self._hand_over()

    def hexdigest(self) -> str:
        if self._closed:
            raise RuntimeError("the blob's hash was closed before its end")
        worker = self._worker
        if worker is not None:
            self._end_thread()
            worker.done.wait()
            if worker.failed is not None:
                raise RuntimeError("the thread hashing a blob failed") from worker.failed
        for piece in self._gathered:
            self._hasher.update(piece)
        self._gathered, self._gathered_size = [], 0
        return self._hasher.hexdigest()

    def close(self) -> None:
        self._closed = True
        self._end_thread()

    def _end_thread(self) -> None:
        if self._stopped is not None:
            self._stopped()

    def _hand_over(self) -> None:
        worker = self._worker
        if worker is None:
            worker = _Worker(self._hasher)
            try:
                self._start(worker.run)
            except RuntimeError:  # no thread to be had (MAX_THREADS, a process at its limit): the loop hashes
                for piece in self._gathered:
                    self._hasher.update(piece)
                self._gathered, self._gathered_size = [], 0
                return
            self._worker = worker
            # The thread ends with the blob, also when nobody calls close: when this object is collected.
            self._stopped = weakref.finalize(self, worker.stop)
        worker.room.acquire()  # waits only while the thread is MAX_BEHIND behind
        worker.batches.put(self._gathered)
        self._gathered, self._gathered_size = [], 0
