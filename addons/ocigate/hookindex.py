"""mitmproxy's addon manager, walking for each event only the chain's entries that have a handler for it.

mitmproxy dispatches every event (each request's requestheaders, request, responseheaders and response, and an
`update` after each of them) to every entry of its chain: for each of the 34 entries of mitmdump's chain a coroutine,
a generator walking its sub-addons, a `safecall` context and a getattr, whether the entry has a handler or not. That
walk was about a quarter of plain mitmproxy's CPU per request, measured on a manifest GET. A request's events have
three to thirteen handlers among those 34 entries, and `update` none in mitmdump.

`IndexedAddonManager` keeps, per event name, the entries that have a handler for it, found as mitmproxy finds them,
and calls just those, in chain order, as mitmproxy's `safecall` does: an error in one is logged and the walk goes on,
`AddonHalt` ends it, `OptionsError` is raised. The index is made again whenever the chain changes (an addon added,
removed or moved). An entry with sub-addons (an `addons` attribute: mitmproxy's script loader, whose scripts come and
go) is walked as mitmproxy walks it, every time. What the index does not follow: a top-level addon that gains a
handler after the index was made (it is looked up again on each call, so one that replaces or loses its handler is
followed).
"""

import dataclasses
import inspect
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks


class IndexedAddonManager(addonmanager.AddonManager):
    """See the module: only the async walk every flow's events take (`handle_lifecycle`, `trigger_event`) differs
    from mitmproxy's."""

    # The chain the index was made for (a copy), and the index: event name -> (entry, whether it is walked whole).
    # One value, replaced whole, for logging's threads ask too (handles).
    _indexed: tuple[list[Any], dict[str, list[tuple[Any, bool]]]] = ([], {})

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        # As mitmproxy's, with the event's arguments read once.
        args = _arguments(event)
        await self._walk(event, args)
        if isinstance(args[0], flow.Flow):
            update = hooks.UpdateHook([args[0]])
            await self._walk(update, [update.flows])

    async def trigger_event(self, event: hooks.Hook) -> None:
        await self._walk(event, _arguments(event))

    async def _walk(self, event: hooks.Hook, args: list[Any]) -> None:
        for entry, whole in self._entries(event.name):
            # mitmproxy's safecall, without a context manager's generator for each call.
            try:
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
            except exceptions.OptionsError:
                raise
            except Exception as e:
                trace = addonmanager.cut_traceback(e.__traceback__, "invoke_addon")
                addonmanager.logger.error(f"Addon error: {e}", exc_info=(type(e), e, trace))

    def handles(self, name: str) -> bool:
        """Whether an addon of the chain, or one under an entry, has a handler for the event `name`."""
        for entry, whole in self._entries(name):
            if not whole or any(_has_handler(addon, name) for addon in addonmanager.traverse([entry])):
                return True
        return False

    def _entries(self, name: str) -> list[tuple[Any, bool]]:
        seen, index = self._indexed
        if seen != self.chain:  # list equality: identity first, element by element
            seen, index = self._indexed = (list(self.chain), {})
        entries = index.get(name)
        if entries is None:
            entries = index[name] = [
                (entry, hasattr(entry, "addons"))
                for entry in seen
                if hasattr(entry, "addons") or _has_handler(entry, name)
            ]
        return entries


_FIELDS: dict[type, tuple[str, ...]] = {}


def _arguments(event: hooks.Hook) -> list[Any]:
    """event.args(), without walking the dataclass's fields each time (an event class's fields are fixed)."""
    kind = type(event)
    if kind.args is not hooks.Hook.args:
        return event.args()
    names = _FIELDS.get(kind)
    if names is None:
        names = _FIELDS[kind] = tuple(field.name for field in dataclasses.fields(event))  # type: ignore[arg-type]
    return [getattr(event, name) for name in names]


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
