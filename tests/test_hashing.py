"""hashing.BackgroundHash: the blob's digest is the one hashlib gives, computed off the calling (event loop) thread
for all but the last batch, in order, with the lag behind the loop bounded and no thread left behind."""

import gc
import hashlib
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocigate import hashing
from ocigate.hashing import BATCH, IN_THE_LOOP, MAX_BEHIND, BackgroundHash


def noting_threads(started: list[threading.Thread]) -> Callable[[Callable[[], None]], None]:
    """A BackgroundHash's way to start its thread that keeps the thread, for the test to join."""

    def start(run: Callable[[], None]) -> None:
        thread = threading.Thread(target=run, daemon=True)
        started.append(thread)
        thread.start()

    return start


pieces = st.lists(
    st.one_of(st.binary(max_size=300), st.integers(1, 3 * BATCH // 2).map(lambda n: bytes([n % 251]) * n)),
    max_size=24,
)


@settings(max_examples=60, deadline=None)
@given(pieces, st.sampled_from(["sha256", "sha512"]))
def test_the_digest_is_hashlibs_for_any_pieces(given_pieces: list[bytes], algorithm: str) -> None:
    hashed = BackgroundHash(algorithm)
    for piece in given_pieces:
        hashed.update(piece)
    assert hashed.hexdigest() == hashlib.new(algorithm, b"".join(given_pieces)).hexdigest()


def test_a_small_blob_starts_no_thread() -> None:
    started: list[Callable[[], None]] = []
    hashed = BackgroundHash("sha256", start=started.append)
    for _ in range(IN_THE_LOOP // BATCH):
        hashed.update(b"a" * BATCH)
    assert hashed.hexdigest() == hashlib.sha256(b"a" * IN_THE_LOOP).hexdigest()
    assert started == []


def test_hashing_happens_on_a_thread_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []

    class Recording:
        def __init__(self) -> None:
            self._inner = hashlib.sha256()

        def update(self, data: bytes) -> None:
            seen.append((threading.get_ident(), len(data)))
            self._inner.update(data)

        def hexdigest(self) -> str:
            return self._inner.hexdigest()

    monkeypatch.setitem(hashing.ALGORITHMS, "sha256", Recording)
    hashed = BackgroundHash("sha256")
    blob = b"x" * (IN_THE_LOOP + 4 * BATCH + 10)
    for start in range(0, len(blob), 65536):
        hashed.update(blob[start : start + 65536])
    assert hashed.hexdigest() == hashlib.sha256(blob).hexdigest()
    here = threading.get_ident()
    on_the_loop = sum(size for thread, size in seen if thread == here)
    assert sum(size for _, size in seen) == len(blob)
    assert on_the_loop < IN_THE_LOOP + BATCH  # the start, and the tail that never made a batch


def test_the_loop_waits_once_the_thread_is_max_behind() -> None:
    started: list[Callable[[], None]] = []
    hashed = BackgroundHash("sha256", start=started.append)  # the thread is not running yet
    piece = b"y" * BATCH
    count = (IN_THE_LOOP + MAX_BEHIND) // BATCH + 2
    fed = threading.Event()

    def feed() -> None:
        for _ in range(count):
            hashed.update(piece)
        fed.set()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    feeder.join(timeout=0.5)
    assert not fed.is_set()  # stopped once MAX_BEHIND bytes were handed over, none hashed
    assert feeder.is_alive()
    (run,) = started
    threading.Thread(target=run, daemon=True).start()  # the thread catches up, the loop goes on
    assert fed.wait(timeout=30)
    assert hashed.hexdigest() == hashlib.sha256(piece * count).hexdigest()


def test_a_closed_hash_ends_its_thread() -> None:
    started: list[threading.Thread] = []
    start = noting_threads(started)

    hashed = BackgroundHash("sha256", start=start)
    hashed.update(b"c" * (IN_THE_LOOP + BATCH))
    hashed.close()  # the flow failed mid-blob
    started[0].join(timeout=30)
    assert not started[0].is_alive()


def test_a_dropped_hash_ends_its_thread() -> None:
    started: list[threading.Thread] = []
    start = noting_threads(started)

    hashed = BackgroundHash("sha256", start=start)
    hashed.update(b"d" * (IN_THE_LOOP + BATCH))
    del hashed  # its flow was dropped without a word
    gc.collect()
    started[0].join(timeout=30)
    assert not started[0].is_alive()


def test_a_failing_thread_is_an_error_at_the_end_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def update(self, data: bytes) -> None:
            raise MemoryError("no memory")

        def hexdigest(self) -> str:
            raise AssertionError("not reached")

    monkeypatch.setitem(hashing.ALGORITHMS, "sha256", Broken)
    hashed = BackgroundHash("sha256")
    hashed.update(b"z" * (IN_THE_LOOP + BATCH))
    with pytest.raises(RuntimeError, match="hashing a blob failed"):
        hashed.hexdigest()


def test_without_a_thread_the_loop_hashes() -> None:
    def refuse(run: Callable[[], None]) -> None:
        raise RuntimeError("can't start new thread")

    hashed = BackgroundHash("sha256", start=refuse)
    blob = b"z" * (IN_THE_LOOP + 3 * BATCH)
    for start in range(0, len(blob), BATCH):
        hashed.update(blob[start : start + BATCH])
    assert hashed.hexdigest() == hashlib.sha256(blob).hexdigest()


def test_a_closed_hash_takes_no_more_pieces_and_never_blocks_the_loop() -> None:
    started: list[threading.Thread] = []
    start = noting_threads(started)

    hashed = BackgroundHash("sha256", start=start)
    hashed.update(b"e" * (IN_THE_LOOP + BATCH))
    hashed.close()  # the gateway stops while mitmproxy still streams the blob
    for _ in range(4 * MAX_BEHIND // BATCH):  # far more than the thread would have room for
        hashed.update(b"e" * BATCH)
    with pytest.raises(RuntimeError, match="closed before its end"):
        hashed.hexdigest()


def test_past_max_threads_blobs_are_hashed_in_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "_threads", threading.BoundedSemaphore(1))
    first = BackgroundHash("sha256")
    blob = b"f" * (IN_THE_LOOP + 2 * BATCH)
    first.update(blob)  # takes the only thread
    second = BackgroundHash("sha256")
    second.update(blob)  # none left: hashed in the loop, and right
    assert second._worker is None
    assert second.hexdigest() == hashlib.sha256(blob).hexdigest()
    assert first.hexdigest() == hashlib.sha256(blob).hexdigest()
