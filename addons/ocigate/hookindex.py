"""mitmproxy's addon manager, walking for each event only the chain's entries that have a handler for it.

mitmproxy dispatches every event (each request's requestheaders, request, responseheaders and response, and an
`update` after each of them) to every entry of its chain: for each of the three dozen entries of mitmdump's chain a
coroutine, a generator walking its sub-addons, a `safecall` context and a getattr, whether the entry has a handler or
not. That walk was about a quarter of plain mitmproxy's CPU per request, measured on a manifest GET
(docs/benchmarks.md). A request's events have from two to about a dozen handlers among those entries, and `update`
none in mitmdump but what a script brings.

`IndexedAddonManager` keeps, per event name, the entries that have a handler for it, found as mitmproxy finds them,
and calls just those, in chain order, as mitmproxy's `safecall` does: an error in one is logged and the walk goes on,
`AddonHalt` ends it, `OptionsError` is raised. The index is made again whenever the chain holds other addons (one
added, removed or moved; compared by identity). An entry with sub-addons (an `addons` attribute: mitmproxy's script
loader, whose scripts come and go), or one that cannot be read, is walked as mitmproxy walks it, every time; an addon
added to the chain during a walk gets that event, as in mitmproxy's walk. What the index does not follow: a top-level
addon that gains a handler, or sub-addons, after the index was made (a handler is looked up again on each call, so
one that is replaced or lost is followed).
"""

import dataclasses
import inspect
import types
from collections.abc import Callable, Iterable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks


class IndexedAddonManager(addonmanager.AddonManager):
    """See the module: the async walk every flow's events take (`handle_lifecycle`, `trigger_event`) differs from
    mitmproxy's, and `handles` answers from the index."""

    # The chain the index was made for (its entries, held so that their ids stay theirs, and those ids) and the index:
    # event name -> (entry, whether it is walked whole). Logging's threads read it too (handles): a new chain's index
    # replaces the tuple whole, and an event's entries are added to its dict in one store (atomic under the GIL).
    _indexed: tuple[list[Any], list[int], dict[str, list[tuple[Any, bool]]]]

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
        chain = self.chain
        entries = self._entries(event.name)
        count = len(chain)
        for entry, whole in entries:
            if await self._call(entry, whole, event, args):
                return
        # An addon added during the walk (AddonManager.add appends to the list being walked) gets the event, as
        # mitmproxy's walk gives it.
        while count < len(chain):
            entry = chain[count]
            count += 1
            if await self._call(entry, True, event, args):
                return

    async def _call(self, entry: Any, whole: bool, event: hooks.Hook, args: list[Any]) -> bool:
        """Calls one entry's handler, as mitmproxy's safecall guards it (without a context manager's generator for
        each call); True when it halted the walk."""
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
            return True
        except exceptions.OptionsError:
            raise
        except Exception as e:
            trace = addonmanager.cut_traceback(addonmanager.cut_traceback(e.__traceback__, "_call"), "invoke_addon")
            addonmanager.logger.error(f"Addon error: {e}", exc_info=(type(e), e, trace))
        return False

    def handles(self, name: str) -> bool:
        """Whether an addon of the chain, or one under an entry, has a callable handler for the event `name` (what
        mitmproxy's walk would call)."""
        return any(
            has_handler(addonmanager.traverse([entry]) if whole else (entry,), name)
            for entry, whole in self._entries(name)
        )

    def _entries(self, name: str) -> list[tuple[Any, bool]]:
        seen, ids, index = self._indexed
        chain = self.chain
        if len(chain) != len(ids) or list(map(id, chain)) != ids:  # the same addons, by identity, in that order
            seen, ids, index = self._indexed = (list(chain), list(map(id, chain)), {})
        entries = index.get(name)
        if entries is None:
            entries = index[name] = [
                (entry, whole) for entry in seen if (whole := _walked_whole(entry, name)) is not None
            ]
        return entries


def _walked_whole(entry: Any, name: str) -> bool | None:
    """How the walk of event `name` takes a chain entry: True, whole, as mitmproxy walks it (it has sub-addons, or
    reading it raised: mitmproxy's walk then logs that error); False, its handler called; None, skipped (no handler)."""
    try:
        if hasattr(entry, "addons"):
            return True
        handler = getattr(entry, name, None)
        return False if handler and not isinstance(handler, types.ModuleType) else None
    except Exception:
        return True


def has_handler(addons: Iterable[Any], name: str) -> bool:
    """Whether one of `addons` has a callable handler for the event `name` (what mitmproxy's walk would call)."""
    return any(callable(getattr(addon, name, None)) for addon in addons)


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
    assert isinstance(manager, IndexedAddonManager)
    manager._indexed = ([], [], {})
