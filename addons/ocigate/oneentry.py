"""ocigate's addons as one entry of mitmproxy's addon chain.

mitmproxy's own addon manager (under `mitmdump -s addons/gateway.py`) walks its whole chain for every hook of every
flow: a request kept alive on its connection fires requestheaders, request, responseheaders and response, and an
update after each. Each entry of the chain costs a traversal, a getattr, a context manager and a coroutine per hook,
whether it has the hook or not, and each addon that has it gets the hook's arguments built anew. ocigate's nine addons
(ten in a worker) were nine entries more to walk; as one entry, mitmproxy walks one, and the entry calls, for each
hook, just those of its addons that have it, in order (the CPU it saves on each manifest by tag: docs/benchmarks.md).
The `ocigate` masters' manager walks only the entries that have a hook (hookindex.py), this one among them.

Each addon stays apart as it was as an entry of its own: an error in one is logged as mitmproxy logs an addon's error
(on mitmproxy's logger, so that logscrub's filter reads it) and the next addon still runs; AddonHalt and OptionsError
go on to mitmproxy as they would have. (mitmproxy's sub-addons, an `addons` attribute, would be walked as entries
are, and an error in one would skip the rest.)
"""

import inspect
import logging
import types
from collections.abc import Callable, Sequence
from typing import Any

# The modules that declare mitmproxy's hooks: hooks.all_hooks knows a hook once its module is imported.
import mitmproxy.addonmanager
import mitmproxy.proxy.layers
import mitmproxy.proxy.server_hooks
from mitmproxy import exceptions, hooks

# Where mitmproxy logs an addon's error (addonmanager.safecall).
_ADDON_ERRORS = logging.getLogger(mitmproxy.addonmanager.__name__)
# Hooks mitmproxy calls outside its safecall, whose errors stop what mitmproxy is doing: an addon that cannot load
# must not leave a gateway running without it.
_UNGUARDED = frozenset({"load"})
# Hooks mitmproxy calls synchronously somewhere (AddonManager.trigger, invoke_addon_sync, the script loader): an
# async handler among the members would make the entry's handler async, and mitmproxy would refuse it for them all.
_SYNCHRONOUS = frozenset({"load", "configure", "running", "update"})


class OneEntry:
    """`members` as one entry of mitmproxy's chain: each hook any of them has is an attribute of this entry that
    calls theirs in order; the hooks none has are no attribute, so mitmproxy calls nothing for them."""

    name = "ocigate"  # mitmproxy's name for the entry (AddonManager.get)

    def __init__(self, members: Sequence[object]) -> None:
        self.members = tuple(members)
        # What each hook calls, in order.
        self.handlers: dict[str, tuple[Callable[..., Any], ...]] = {}
        for hook in sorted(hooks.all_hooks):
            handlers = [
                handler
                for member in self.members
                if callable(handler := getattr(member, hook, None)) and not isinstance(handler, types.ModuleType)
            ]
            if not handlers:
                continue
            if hook in _SYNCHRONOUS and any(inspect.iscoroutinefunction(handler) for handler in handlers):
                raise TypeError(f"ocigate's {hook} hooks must be synchronous: mitmproxy calls them so")
            self.handlers[hook] = tuple(handlers)
            setattr(self, hook, _dispatcher(hook, handlers))

    def member(self, kind: type) -> Any:
        """The member that is a `kind`; LookupError when none is."""
        for member in self.members:
            if isinstance(member, kind):
                return member
        raise LookupError(f"no {kind.__name__} among ocigate's addons")


def _dispatcher(hook: str, handlers: list[Callable[..., Any]]) -> Callable[..., Any]:
    """One callable for `hook`: a coroutine function when any handler is one (mitmproxy awaits it), else a plain
    function (mitmproxy's synchronous hooks, configure among them, refuse a coroutine function)."""
    if hook in _UNGUARDED:

        def unguarded(*args: Any) -> None:
            for handler in handlers:
                handler(*args)

        return unguarded
    if any(inspect.iscoroutinefunction(handler) for handler in handlers):

        async def each_awaited(*args: Any) -> None:
            for handler in handlers:
                try:
                    result = handler(*args)
                    if inspect.isawaitable(result):
                        await result
                except (exceptions.AddonHalt, exceptions.OptionsError):
                    raise
                except Exception as e:
                    _logged(e)

        return each_awaited

    def each(*args: Any) -> None:
        for handler in handlers:
            try:
                handler(*args)
            except (exceptions.AddonHalt, exceptions.OptionsError):
                raise
            except Exception as e:
                _logged(e)

    return each


def _logged(error: Exception) -> None:
    """As mitmproxy's safecall logs an addon's error: its text and its traceback from the addon's hook on."""
    # From the handler's frame on; the dispatcher's own when the error was raised in it (a handler's arguments).
    raised = error.__traceback__
    traceback = (raised.tb_next or raised) if raised is not None else None
    _ADDON_ERRORS.error("Addon error: %s", error, exc_info=(type(error), error, traceback))
