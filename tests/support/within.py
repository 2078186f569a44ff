"""Calls that must not block: a regression that reads a FIFO would hang the whole test run instead of failing."""

import threading
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def returns_within(seconds: float, call: Callable[[], T]) -> T:
    """call() in a daemon thread (an event loop's deadline cannot interrupt a call that blocks the loop itself): its
    result or its exception, or a failed test if it has not returned within `seconds`. A thread left blocked is a
    daemon's, so it does not keep the run from ending."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(call())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{call} did not return within {seconds:g} s: it blocks")
    if errors:
        raise errors[0]
    return results[0]
