"""mitmproxy's deprecated add_log event, sent only while an addon listens for it.

mitmproxy logs with Python's logging since version 9, and still turns every record into the add_log event of the
addons written before: a handler on the root logger (mitmproxy.log.LegacyLogEvents) formats the record, wakes the
event loop through its self-pipe and has it walk the whole addon chain for add_log, whether any addon has that hook
or not. The gateway logs a line for every request it handles, so each request paid for that walk
(docs/benchmarks.md). Once the gateway runs, a filter on that handler lets a record through only while an addon in
the chain (a script's among them) has an add_log hook: a script written for mitmproxy 8 still gets its events.
"""

import logging
from collections.abc import Callable, Iterable
from functools import partial

from mitmproxy import ctx
from mitmproxy.addonmanager import AddonManager, traverse
from mitmproxy.log import LegacyLogEvents

from .hookindex import IndexedAddonManager, has_handler


class WhileAddLogIsHeard(logging.Filter):
    """Passes a record while `heard()` says an addon has an add_log hook. Asked on whatever thread logs: it reads the
    chain, and changes nothing. It never raises (logging calls a handler's filters unguarded, so an error would escape
    every logging call): an addon it cannot read passes the record, as mitmproxy without the filter would, whose own
    walk of the chain then reports that addon."""

    def __init__(self, heard: Callable[[], bool]) -> None:
        super().__init__()
        self.heard = heard

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return self.heard()
        except Exception:
            return True


def heard_in(chain: Iterable[object]) -> bool:
    """Whether an addon of `chain` (or one under it) has an add_log hook, found as mitmproxy's walk finds it."""
    return has_handler(traverse(chain), "add_log")


class AddLogWhenHeard:
    """Puts the filter on this master's add_log handler once the gateway runs; takes it off when the gateway ends.
    (A listener added later gets the lines logged from then on.)"""

    def __init__(self) -> None:
        self.filtered: list[tuple[LegacyLogEvents, WhileAddLogIsHeard]] = []

    def running(self) -> None:
        master = ctx.master
        filtered = [handler for handler, _ in self.filtered]
        for handler in logging.getLogger().handlers:
            if isinstance(handler, LegacyLogEvents) and handler.master is master and handler not in filtered:
                listening = WhileAddLogIsHeard(_heard(master.addons))
                handler.addFilter(listening)
                self.filtered.append((handler, listening))

    def done(self) -> None:
        for handler, listening in self.filtered:
            handler.removeFilter(listening)
        self.filtered = []


def _heard(manager: AddonManager) -> Callable[[], bool]:
    # The ocigate masters' manager knows which entries have the hook (hookindex.py); mitmproxy's own (`mitmdump -s
    # addons/gateway.py`) is walked.
    if isinstance(manager, IndexedAddonManager):
        return partial(manager.handles, "add_log")
    return lambda: heard_in(manager.chain)
