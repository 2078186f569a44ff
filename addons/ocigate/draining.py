"""How the gateway stops on SIGTERM: at once, or after a drain (`ocigate_drain` seconds) during which `/readyz`
answers 503 while every request, new or under way, is still served, so that a load balancer (a Kubernetes Service)
sees the gateway leave before it stops listening.

mitmproxy's own SIGTERM handler (tools/main.py) shuts the master down at once; this addon's `running` hook, which
comes after it, puts its own in its place. The drain lasts its full time, even with no flow under way: a client the
load balancer has not yet been told about may still come. A second SIGTERM, or SIGINT (mitmproxy's handler, left as
it is), stops the gateway at once. A worker of `ocigate --workers N` whose parent is gone (the SIGTERM came from
PR_SET_PDEATHSIG, see worker.follow_parent) stops at once too: nothing is left to wait for it.
"""

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from mitmproxy import ctx

from .configuration import Shared
from .workeridentity import Identity

log = logging.getLogger("ocigate")


class Draining:
    """Replaces mitmproxy's SIGTERM handler with one that drains for `ocigate_drain` seconds before shutting down."""

    def __init__(
        self,
        shared: Shared,
        worker: Identity | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        shutdown: Callable[[], None] | None = None,
    ) -> None:
        self.shared = shared
        self.worker = worker
        self._sleep = sleep
        self._shutdown = shutdown  # None: mitmproxy's master's
        self._draining: asyncio.Task[None] | None = None

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        # Not every loop takes signal handlers (Windows' Proactor): mitmproxy's own stays in force there.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, self.sigterm)

    def sigterm(self) -> None:
        """SIGTERM came (on the event loop)."""
        if self._draining is not None:
            log.warning("ocigate: SIGTERM again: stopping now")
            self._stop()
            return
        seconds = self.shared.settings.drain if self.shared.configured else 0
        if seconds > 0 and self._parent_gone():
            log.warning("ocigate: SIGTERM: the parent of this worker is gone: stopping now, without draining")
            seconds = 0
        if seconds <= 0:
            self._stop()
            return
        # From now on /readyz answers 503 (operating.Operating.ready); everything else goes on as before.
        self.shared.stopping = True
        log.warning(
            "ocigate: SIGTERM: draining for %d s (/readyz answers 503, requests are still served); "
            "a second SIGTERM or SIGINT stops at once",
            seconds,
        )
        self._draining = asyncio.get_running_loop().create_task(self._drain(seconds))

    async def _drain(self, seconds: int) -> None:
        await self._sleep(seconds)
        log.info("ocigate: drained for %d s: stopping", seconds)
        self._stop()

    def _parent_gone(self) -> bool:
        return self.worker is not None and self.worker.parent_gone()

    def _stop(self) -> None:
        (self._shutdown or ctx.master.shutdown)()

    async def done(self) -> None:
        if self._draining is not None:
            self._draining.cancel()
            await asyncio.gather(self._draining, return_exceptions=True)
