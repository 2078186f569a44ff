"""hookindex: the indexed walk calls what mitmproxy's own walk calls, in the same order, with the same errors logged
and the same halts, whatever the chain holds and however it changes between events."""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mitmproxy import addonmanager, exceptions, hooks
from mitmproxy.master import Master
from mitmproxy.options import Options
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster

from ocigate.hookindex import IndexedAddonManager, index_hooks
from ocigate.masters import OcigateMaster, OcigateWebMaster

EVENTS = ("requestheaders", "request", "response")
# mitmproxy follows each flow's event with an update event; running: an event with no flow, sent by trigger_event
HANDLED = (*EVENTS, "update", "running")
MAKE = {"requestheaders": HttpRequestHeadersHook, "request": HttpRequestHook, "response": HttpResponseHook}


@dataclass(frozen=True)
class Spec:
    """One addon: which of EVENTS it handles, how (sync or async), what it does then, and its sub-addons."""

    handles: tuple[str, ...]
    is_async: bool = False
    # or "fail" (an error mitmproxy logs), "halt" (AddonHalt: the walk ends), "options" (OptionsError: raised),
    # "adds" (an addon added to the chain during the walk)
    does: str = "record"
    children: tuple["Spec", ...] | None = None  # None: no `addons` attribute
    equal: bool = False  # equal (==) to every other addon made so: only identity tells them apart
    unreadable: bool = False  # once in the chain, reading any attribute it lacks raises KeyError


class Unreadable:
    def __getattr__(self, name: str) -> Any:
        if self.__dict__.get("armed"):
            raise KeyError(name)
        raise AttributeError(name)


class Equal:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Equal)

    __hash__ = object.__hash__


def _make(spec: Spec, label: str, calls: list[str], add: Callable[[Spec], None] = lambda spec: None) -> Any:
    def act(event: str) -> None:
        calls.append(f"{label}.{event}")
        if spec.does == "adds":
            add(Spec(HANDLED))
        if spec.does == "fail":
            raise ValueError(f"{label} fails")
        if spec.does == "halt":
            raise exceptions.AddonHalt()
        if spec.does == "options":
            raise exceptions.OptionsError(f"{label} refuses")

    namespace: dict[str, Any] = {"name": label}
    for event in spec.handles:
        if spec.is_async:

            async def handler(self: Any, *args: Any, _event: str = event) -> None:
                act(_event)
        else:

            def handler(self: Any, *args: Any, _event: str = event) -> None:
                act(_event)

        namespace[event] = handler
    bases = (Equal,) if spec.equal else (Unreadable,) if spec.unreadable else ()
    addon = type(f"Addon_{label}", bases, namespace)()
    if spec.children is not None:
        addon.addons = [_make(child, f"{label}_{i}", calls) for i, child in enumerate(spec.children)]
    return addon


def _specs(depth: int = 1) -> st.SearchStrategy[Spec]:
    leaf = st.builds(
        Spec,
        handles=st.lists(st.sampled_from(HANDLED), unique=True).map(tuple),
        is_async=st.booleans(),
        does=st.sampled_from(["record", "record", "record", "fail", "halt", "options", "adds"]),
        equal=st.booleans(),
        unreadable=st.sampled_from([False, False, False, True]),
    )
    if depth == 0:
        return leaf
    return st.one_of(
        leaf,
        st.builds(
            Spec,
            handles=st.lists(st.sampled_from(HANDLED), unique=True).map(tuple),
            children=st.lists(_specs(depth - 1), max_size=3).map(tuple),
        ),
    )


@dataclass
class Side:
    """One master, mitmproxy's walk or the indexed one, over its own addons made from the same specs."""

    master: Master
    calls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.side: Side | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.side is not None:
            self.side.errors.append(record.getMessage())


# A step between events: ("event", name) | ("add", spec) | ("remove", index) | ("move", index) |
# ("child", index, spec): a sub-addon appended to an entry that has sub-addons | ("drop", index, event): the
# entry's handler for the event replaced by None on the instance.
STEPS = st.one_of(
    st.tuples(st.just("event"), st.sampled_from((*EVENTS, "running"))),
    st.tuples(st.just("add"), _specs()),
    st.tuples(st.just("remove"), st.integers(0, 20)),
    st.tuples(st.just("move"), st.integers(0, 20)),
    st.tuples(st.just("child"), st.integers(0, 20), _specs(0)),
    st.tuples(st.just("drop"), st.integers(0, 20), st.sampled_from(HANDLED)),
)


async def _run(side: Side, chain: list[Spec], steps: list[tuple], errors: _Errors) -> None:
    manager = side.master.addons
    made = 0

    def add(spec: Spec) -> None:
        nonlocal made
        addon = _make(spec, f"a{made}", side.calls, add)
        made += 1
        manager.add(addon)
        addon.__dict__["armed"] = True

    for spec in chain:
        add(spec)
    flow = tflow.tflow(resp=True)
    errors.side = side
    for step in steps:
        kind, *rest = step
        entries = manager.chain
        try:
            if kind == "event" and rest[0] == "running":
                await manager.trigger_event(hooks.RunningHook())
            elif kind == "event":
                await manager.handle_lifecycle(MAKE[rest[0]](flow))
            elif kind == "add":
                add(rest[0])
            elif kind == "remove" and entries:
                manager.remove(entries[rest[0] % len(entries)])
            elif kind == "move" and entries:
                # In place, as ocigate's masters move their entry.
                entries.append(entries.pop(rest[0] % len(entries)))
            elif kind == "child" and entries:
                target = entries[rest[0] % len(entries)]
                if hasattr(target, "addons"):
                    # As an addon that manages sub-addons adds one (AddonManager.register's docstring).
                    child = _make(rest[1], f"{target.name}_c{len(target.addons)}", side.calls)
                    target.addons.append(manager.register(child))
            elif kind == "drop" and entries:
                setattr(entries[rest[0] % len(entries)], rest[1], None)
        except (exceptions.OptionsError, exceptions.AddonManagerError, KeyError) as e:
            # An OptionsError from a walk; an unreadable addon makes mitmproxy's own add, remove and register raise.
            side.calls.append(f"raised {type(e).__name__} {e}")
    errors.side = None


def _master() -> Master:
    """A bare master, without the handler each master puts on the root logger to send the add_log event (never
    taken off, it would outlive the test, and an addon that cannot be read would have each error logged as an
    add_log event that logs that error again)."""
    master = Master(Options())
    master._legacy_log_events.uninstall()
    return master


@settings(max_examples=150, deadline=None)
@given(chain=st.lists(_specs(), max_size=8), steps=st.lists(STEPS, max_size=25))
# An addon removed and another put in its place that equals it (==): the chain is another one all the same.
@example(
    chain=[Spec(("request",), equal=True)],
    steps=[("event", "request"), ("remove", 0), ("add", Spec(("request",), equal=True)), ("event", "request")],
)
async def test_the_indexed_walk_calls_logs_and_halts_as_mitmproxys_own(chain: list[Spec], steps: list) -> None:
    errors = _Errors()
    logger = logging.getLogger("mitmproxy.addonmanager")
    logger.addHandler(errors)
    try:
        ours, theirs = Side(_master()), Side(_master())
        index_hooks(ours.master.addons)
        await _run(theirs, chain, steps, errors)
        await _run(ours, chain, steps, errors)
    finally:
        logger.removeHandler(errors)
    assert ours.calls == theirs.calls
    assert ours.errors == theirs.errors


def _expanded(entries: list[Any], name: str) -> list[Any]:
    """The addons a walk of these entries would reach for `name`: the index's entries, sub-addons walked whole."""
    return [a for entry in entries for a in addonmanager.traverse([entry]) if callable(getattr(a, name, None))]


@pytest.mark.parametrize("kind", ["mitmdump", "ocigate", "ocigate web"])
async def test_on_a_real_chain_every_event_reaches_the_addons_mitmproxy_would_and_skips_the_rest(kind: str) -> None:
    master: Master
    if kind == "mitmdump":
        master = DumpMaster(Options(), with_termlog=False)
        index_hooks(master.addons)
    elif kind == "ocigate":
        master = OcigateMaster(Options(), with_termlog=False)  # indexed by its own constructor
    else:
        master = OcigateWebMaster(Options(), with_termlog=False)
    manager = master.addons
    assert isinstance(manager, IndexedAddonManager)
    for name in sorted(hooks.all_hooks):
        wanted = [a for a in addonmanager.traverse(manager.chain) if callable(getattr(a, name, None))]
        entries = [entry for entry, _ in manager._entries(name)]
        assert _expanded(entries, name) == wanted, name
    # The point of it: a request's events walk a few entries, not all 34.
    assert len(manager.chain) > 30
    viewed = ["View"] if kind == "ocigate web" else []  # mitmweb's flow list follows each flow's updates
    assert [type(e).__name__ for e, _ in manager._entries("update")] == ["ScriptLoader", *viewed]
    assert len(manager._entries("requestheaders")) < 7


async def test_an_error_is_logged_as_mitmproxy_logs_it_and_the_next_entry_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []
    master = _master()
    index_hooks(master.addons)
    master.addons.add(_make(Spec(("request",), does="fail"), "broken", calls), _make(Spec(("request",)), "b", calls))
    with caplog.at_level(logging.ERROR, "mitmproxy.addonmanager"):
        await master.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
    assert calls == ["broken.request", "b.request"]
    assert [r.getMessage() for r in caplog.records] == ["Addon error: broken fails"]


async def test_a_handler_that_is_not_callable_is_an_addon_error_logged_as_mitmproxy_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logged = []
    for indexed in (False, True):
        master = _master()
        if indexed:
            index_hooks(master.addons)
        odd = _make(Spec(("request",)), "odd", [])
        master.addons.add(odd)
        odd.request = "not a function"
        caplog.clear()
        with caplog.at_level(logging.ERROR, "mitmproxy.addonmanager"):
            await master.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        logged.append([r.getMessage().replace(repr(odd), "odd") for r in caplog.records])
    assert logged[0] == logged[1] == ["Addon error: Addon handler request (odd) not callable"]


async def test_handles_says_whether_the_walk_would_call_a_handler_as_addlog_asks_it() -> None:
    master = _master()
    index_hooks(master.addons)
    manager = master.addons
    assert isinstance(manager, IndexedAddonManager)
    odd = _make(Spec(()), "odd", [])
    odd.add_log = "not a function"  # truthy, not callable: nothing mitmproxy would call
    manager.add(odd)
    assert not manager.handles("add_log")
    listener = _make(Spec(("add_log",)), "listener", [])
    holder = _make(Spec((), children=()), "holder", [])
    manager.add(holder)
    assert not manager.handles("add_log")
    holder.addons.append(manager.register(listener))  # under an entry, as a script's addon is
    assert manager.handles("add_log")
    holder.addons.clear()
    direct = _make(Spec(("add_log",)), "direct", [])
    manager.add(direct)
    assert manager.handles("add_log")
    direct.add_log = None  # lost after the index was made: followed
    assert not manager.handles("add_log")
