"""oneentry: ocigate's addons as one entry of mitmproxy's chain, each addon still apart: called in order for the
hooks it has, its errors logged as mitmproxy logs an addon's and the next addon called all the same."""

import inspect
import logging
import os

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.options import Options
from mitmproxy.test import taddons, tflow
from mitmproxy.tools.dump import DumpMaster

from ocigate.addon import make_addons
from ocigate.oneentry import OneEntry
from ocigate.workeridentity import Identity


class Recorder:
    def __init__(self, name: str, calls: list[str], fails: type[Exception] | None = None) -> None:
        self.name_ = name
        self.calls = calls
        self.fails = fails

    def _called(self, hook: str) -> None:
        self.calls.append(f"{self.name_}.{hook}")
        if self.fails is not None:
            raise self.fails(f"{self.name_} failed in {hook}")

    def request(self, flow: object) -> None:
        self._called("request")

    async def requestheaders(self, flow: object) -> None:
        self._called("requestheaders")

    def configure(self, updated: set[str]) -> None:
        self._called("configure")


class OnlyResponse:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def response(self, flow: object) -> None:
        self.calls.append("only.response")


async def test_each_hook_calls_the_members_that_have_it_in_order_and_no_other_hook_is_there() -> None:
    calls: list[str] = []
    entry = OneEntry([Recorder("a", calls), OnlyResponse(calls), Recorder("b", calls)])
    with taddons.context(entry) as tctx:
        flow = tflow.tflow()
        calls.clear()
        await tctx.master.addons.handle_lifecycle(_hook("requestheaders", flow))
        await tctx.master.addons.handle_lifecycle(_hook("request", flow))
        await tctx.master.addons.handle_lifecycle(_hook("response", flow))
    assert calls == ["a.requestheaders", "b.requestheaders", "a.request", "b.request", "only.response"]
    # mitmproxy finds nothing to call for a hook no member has (getattr gives None).
    assert getattr(entry, "error", None) is None and getattr(entry, "update", None) is None
    assert not hasattr(entry, "addons")  # else mitmproxy would walk the members as entries of their own
    assert [handler.__self__ for handler in entry.handlers["response"]] == [entry.members[1]]


@pytest.mark.parametrize("hook", ["request", "requestheaders"])
async def test_an_error_in_one_member_is_logged_as_mitmproxy_logs_it_and_the_next_member_still_runs(
    hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    entry = OneEntry([Recorder("a", calls, fails=ValueError), Recorder("b", calls)])
    with taddons.context(entry) as tctx:
        calls.clear()
        with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
            await tctx.master.addons.handle_lifecycle(_hook(hook, tflow.tflow()))
    assert calls == [f"a.{hook}", f"b.{hook}"]
    errors = [r for r in caplog.records if r.name == "mitmproxy.addonmanager"]
    assert len(errors) == 1 and errors[0].getMessage() == f"Addon error: a failed in {hook}"
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ValueError


def test_a_refused_option_goes_on_to_mitmproxy() -> None:
    calls: list[str] = []
    entry = OneEntry([Recorder("a", calls, fails=exceptions.OptionsError), Recorder("b", calls)])
    with pytest.raises(exceptions.OptionsError, match="a failed in configure"):
        entry.configure({"x"})  # type: ignore[attr-defined]
    assert calls == ["a.configure"]


async def test_a_member_that_cannot_load_stops_the_gateway_from_starting() -> None:
    class Broken:
        def load(self, loader: object) -> None:
            raise RuntimeError("cannot load")

    master = DumpMaster(Options(), with_termlog=False, with_dumper=False)
    with pytest.raises(RuntimeError, match="cannot load"):
        master.addons.add(OneEntry([Broken()]))


def test_a_member_is_found_by_its_kind() -> None:
    calls: list[str] = []
    only = OnlyResponse(calls)
    entry = OneEntry([Recorder("a", calls), only])
    assert entry.member(OnlyResponse) is only
    with pytest.raises(LookupError, match="no int among ocigate's addons"):
        entry.member(int)


def _hook(name: str, flow: object) -> hooks.Hook:
    return hooks.all_hooks[name](flow)


async def test_addon_halt_stops_the_later_members_and_the_later_entries_as_mitmproxy_has_it() -> None:
    calls: list[str] = []
    after = Recorder("after", calls)
    entry = OneEntry([Recorder("a", calls, fails=exceptions.AddonHalt), Recorder("b", calls)])
    with taddons.context(entry, after) as tctx:
        calls.clear()
        await tctx.master.addons.handle_lifecycle(_hook("request", tflow.tflow()))
    assert calls == ["a.request"]


async def test_a_sync_and_an_async_member_of_one_hook_both_run_in_order() -> None:
    calls: list[str] = []

    class Sync:
        def requestheaders(self, flow: object) -> None:
            calls.append("sync.requestheaders")

    entry = OneEntry([Recorder("a", calls), Sync(), Recorder("b", calls)])
    assert inspect.iscoroutinefunction(entry.requestheaders)  # type: ignore[attr-defined]
    with taddons.context(entry) as tctx:
        calls.clear()
        await tctx.master.addons.handle_lifecycle(_hook("requestheaders", tflow.tflow()))
    assert calls == ["a.requestheaders", "sync.requestheaders", "b.requestheaders"]


@pytest.mark.parametrize("hook", ["load", "configure", "running", "update"])
def test_a_member_with_an_async_hook_mitmproxy_calls_synchronously_is_refused(hook: str) -> None:
    async def handler(*args: object) -> None:
        pass

    member = type("Member", (), {hook: lambda self, *args: handler(*args)})()
    member_async = type("MemberAsync", (), {hook: handler})()
    OneEntry([member])  # a plain function is fine
    with pytest.raises(TypeError, match=f"ocigate's {hook} hooks must be synchronous"):
        OneEntry([member_async])


@pytest.mark.parametrize("worker", [None, Identity(0, 2, os.getpid())])
def test_ocigates_own_addons_make_one_entry_whose_synchronous_hooks_are_synchronous(worker: Identity | None) -> None:
    entry = OneEntry(make_addons(worker))
    for hook in ("load", "configure", "running"):
        assert not inspect.iscoroutinefunction(getattr(entry, hook))
    # Every ocigate addon has a hook mitmproxy calls per request or per connection, so each is reached.
    assert all(any(callable(getattr(member, hook, None)) for hook in vars(entry)) for member in entry.members)
