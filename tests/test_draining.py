"""On SIGTERM, the gateway stops at once, or drains first (ocigate_drain): /readyz answers 503 while requests are
still served, and it stops once the drain is over or a second SIGTERM comes."""

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mitmproxy.test import taddons

from ocigate.configuration import Configuration, Shared
from ocigate.draining import Draining
from ocigate.operating import Operating
from ocigate.workeridentity import Identity


class Clock:
    """A sleep that returns when the test says the time has passed."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.over = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        await self.over.wait()


class Stops:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@dataclass
class Rig:
    addon: Draining
    operating: Operating
    clock: Clock
    stops: Stops


@contextmanager
def draining(drain: int, worker: Identity | None = None) -> Iterator[Rig]:
    shared = Shared()
    clock, stops = Clock(), Stops()
    configuration = Configuration(shared)
    addon = Draining(shared, worker, clock.sleep, stops)
    operating = Operating(shared, {})
    with taddons.context(configuration, operating, addon) as tctx:
        tctx.configure(configuration, ocigate_drain=drain)
        operating.running()
        yield Rig(addon, operating, clock, stops)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_without_a_drain_sigterm_stops_at_once() -> None:
    with draining(0) as rig:
        rig.addon.sigterm()
        assert rig.stops.count == 1
        assert rig.clock.asked == []


async def test_a_drain_is_not_ready_at_once_and_stops_once_it_is_over() -> None:
    with draining(20) as rig:
        assert rig.operating.ready().ok
        rig.addon.sigterm()
        await settle()
        verdict = rig.operating.ready()
        assert not verdict.ok and "shutting down" in verdict.why
        assert rig.operating.alive().ok
        assert rig.clock.asked == [20]
        assert rig.stops.count == 0
        rig.clock.over.set()
        await settle()
        assert rig.stops.count == 1


async def test_a_second_sigterm_stops_at_once() -> None:
    with draining(20) as rig:
        rig.addon.sigterm()
        await settle()
        rig.addon.sigterm()
        assert rig.stops.count == 1
        await rig.addon.done()  # the drain's task ends with the gateway, without stopping it again
        assert rig.stops.count == 1


async def test_a_worker_whose_parent_is_gone_does_not_drain() -> None:
    gone = Identity(0, 2, os.getppid() + 1)
    with draining(20, gone) as rig:
        rig.addon.sigterm()
        assert rig.stops.count == 1 and rig.clock.asked == []
    with draining(20, Identity(0, 2, os.getppid())) as rig:
        rig.addon.sigterm()
        await settle()
        assert rig.stops.count == 0 and rig.clock.asked == [20]
        await rig.addon.done()


async def test_running_puts_its_handler_in_place_of_mitmproxys() -> None:
    loop = asyncio.get_running_loop()
    # Whatever handled SIGTERM before (a stand-in for mitmproxy's, put in place as mitmproxy's run() does, with the
    # loop's add_signal_handler, before the running hook) must not hear it: it is replaced.
    before: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)
    loop.add_signal_handler(signal.SIGTERM, lambda: before.append(signal.SIGTERM))
    try:
        with draining(0) as rig:
            rig.addon.running()
            os.kill(os.getpid(), signal.SIGTERM)
            while not rig.stops.count and not before:
                await asyncio.sleep(0.01)
            assert (rig.stops.count, before) == (1, [])
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)
