"""mitmproxy's addon manager, walking for each event only the chain's entries that have a handler for it.

mitmproxy dispatches every event (each request's requestheaders, request, responseheaders and response, and an
`update` after each of them) to every entry of its chain: for each of the 34 entries of mitmdump's chain a coroutine,
a generator walking its sub-addons, a `safecall` context and a getattr, whether the entry has a handler or not. That
walk was about a quarter of plain mitmproxy's CPU per request, measured on a manifest GET. A request's events have
three to thirteen handlers among those 34 entries, and `update` none in mitmdump.

`IndexedAddonManager` keeps, per event name, the entries that have a handler for it, found as mitmproxy finds them,
and calls just those, in chain order, each under `safecall` as mitmproxy does: an error in one is logged and the walk
goes on, `AddonHalt` ends it. The index is made again whenever the chain changes (an addon added, removed or moved).
An entry with sub-addons (an `addons` attribute: mitmproxy's script loader, whose scripts come and go) is walked as
mitmproxy walks it, every time. What the index does not follow: a top-level addon that gains a handler after the
index was made (it is looked up again on each call, so one that replaces or loses its handler is followed).
"""

import inspect
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks


class IndexedAddonManager(addonmanager.AddonManager):
    """See the module: only `trigger_event` (the async walk every flow's events take) differs from mitmproxy's."""

    _seen: list[Any] | None = None  # the chain the index was made for, a copy
    _index: dict[str, list[tuple[Any, bool]]]  # event name -> (entry, whether it is walked whole)

    async def trigger_event(self, event: hooks.Hook) -> None:
        args = event.args()
        for entry, whole in self._entries(event.name):
            try:
                with addonmanager.safecall():
                    if whole:
                        await self.invoke_addon(entry, event)
                    else:
                        handler = _handler(entry, event.name)
                        if handler is not None:
                            result = handler(*args)
                            if result is not None and inspect.isawaitable(result):
                                await result
            except exceptions.AddonHalt:
                return

    def _entries(self, name: str) -> list[tuple[Any, bool]]:
        if self._seen != self.chain:  # list equality: identity first, element by element
            self._seen = list(self.chain)
            self._index = {}
        entries = self._index.get(name)
        if entries is None:
            entries = [
                (entry, hasattr(entry, "addons"))
                for entry in self._seen
                if hasattr(entry, "addons") or _has_handler(entry, name)
            ]
            self._index[name] = entries
        return entries


def _has_handler(addon: Any, name: str) -> bool:
    handler = getattr(addon, name, None)
    return bool(handler) and not isinstance(handler, types.ModuleType)


def _handler(addon: Any, name: str) -> Callable[..., Any] | None:
    """The addon's handler for an event, as mitmproxy's AddonManager._iter_hooks finds it (a module of that name,
    an import in a script, is no handler; anything else not callable is an error)."""
    handler = getattr(addon, name, None)
    if not handler or isinstance(handler, types.ModuleType):
        return None
    if not callable(handler):
        raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")
    return handler


def index_hooks(manager: addonmanager.AddonManager) -> None:
    """Make a master's addon manager an IndexedAddonManager. mitmproxy's Master makes its manager itself, and its
    options and commands already hold it: it is changed in place (its state is the same; only a method differs)."""
    manager.__class__ = IndexedAddonManager
