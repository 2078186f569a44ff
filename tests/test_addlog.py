"""addlog: mitmproxy's deprecated add_log event goes out only while an addon listens for it, and then reaches it."""

import asyncio
import logging

import pytest
from mitmproxy import hooks
from mitmproxy.log import LogEntry
from mitmproxy.options import Options
from mitmproxy.tools.dump import DumpMaster

from ocigate.addlog import AddLogWhenHeard, WhileAddLogIsHeard, heard_in
from ocigate.addon import make_addons
from ocigate.hookindex import index_hooks
from ocigate.oneentry import OneEntry


class Listener:
    def __init__(self) -> None:
        self.entries: list[str] = []

    def add_log(self, entry: LogEntry) -> None:
        self.entries.append(entry.msg)


class Holder:
    """An addon with sub-addons, as mitmproxy's script loader holds a script."""

    def __init__(self, *addons: object) -> None:
        self.addons = list(addons)


@pytest.mark.parametrize("indexed", [False, True], ids=["mitmproxy's walk", "hookindex"])
async def test_add_log_goes_out_only_while_an_addon_listens_and_then_reaches_it(
    monkeypatch: pytest.MonkeyPatch, indexed: bool
) -> None:
    master = DumpMaster(Options(), with_termlog=False, with_dumper=False)
    if indexed:
        index_hooks(master.addons)
    quiet = AddLogWhenHeard()
    master.addons.add(quiet)
    events: list[str] = []
    trigger = master.addons.trigger

    def counted(event: hooks.Hook) -> None:
        events.append(event.name)
        trigger(event)

    monkeypatch.setattr(master.addons, "trigger", counted)
    try:
        quiet.running()
        handler = master._legacy_log_events  # the handler this master put on the root logger
        assert handler in logging.getLogger().handlers
        record = logging.LogRecord("ocigate", logging.INFO, __file__, 1, "a request", None, None)
        assert not handler.filter(record)  # nobody listens: no event, no walk of the chain
        logging.getLogger("ocigate").warning("heard by nobody")
        await asyncio.sleep(0)
        assert "add_log" not in events
        listener = Listener()
        master.addons.add(Holder(listener))  # a listener under another addon, as a script's is
        assert handler.filter(record)
        logging.getLogger("ocigate").warning("heard by the listener")
        await asyncio.sleep(0)  # the event is sent on the loop
        assert any("heard by the listener" in entry for entry in listener.entries) and "add_log" in events
        assert not any("heard by nobody" in entry for entry in listener.entries)
    finally:
        quiet.done()
        master._legacy_log_events.uninstall()
    assert handler.filters == []


def test_an_addon_the_filter_cannot_read_lets_the_record_through_and_nothing_raises() -> None:
    class Unreadable:
        @property
        def add_log(self) -> object:
            raise RuntimeError("cannot be read")

    record = logging.LogRecord("ocigate", logging.INFO, __file__, 1, "a request", None, None)
    assert WhileAddLogIsHeard(lambda: heard_in([Unreadable()])).filter(record) is True
    assert WhileAddLogIsHeard(lambda: heard_in([Listener()])).filter(record) is True
    assert WhileAddLogIsHeard(lambda: heard_in([Holder(object())])).filter(record) is False
    assert WhileAddLogIsHeard(lambda: heard_in([Holder(Listener())])).filter(record) is True


def test_the_gateways_one_entry_starts_and_stops_the_filter() -> None:
    entry = OneEntry(make_addons())
    quiet = entry.member(AddLogWhenHeard)
    assert quiet.running in entry.handlers["running"] and quiet.done in entry.handlers["done"]
