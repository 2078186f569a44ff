"""The addon that writes the access log and counts the metrics: each flow the gateway handled, once, when it ends
(its answer sent, or its error), from the flow's record as the gateway left it."""

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Literal, TypeVar

from mitmproxy import exceptions, http

from .accesslog import AccessLog, line
from .configuration import Shared
from .metrics import Metrics, MetricsServer, Names, observations
from .passing import Passing, around, bytes_sent
from .probes import LIVENESS_TIMEOUT, Verdict
from .record import FlowRecord
from .settings import MetricsAddress
from .workeridentity import Identity

_T = TypeVar("_T")

log = logging.getLogger("ocigate")

_OPTIONS = frozenset({"ocigate_access_log", "ocigate_metrics"})
# How long a scrape waits for the event loop to read the hosts' health.
_READ_TIMEOUT = 5.0


class Operating:
    def __init__(
        self, shared: Shared, records: Mapping[http.HTTPFlow, FlowRecord], worker: Identity | None = None
    ) -> None:
        self.shared = shared
        self.records = records  # the gateway's, by flow
        self.worker = worker  # which of `ocigate --workers N`'s processes this is; None: a gateway alone
        self.ended: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        # Each streamed answer's wrapper (passing.py), shared with the captures: what reached the client.
        self.passing: weakref.WeakKeyDictionary[http.HTTPFlow, Passing] = weakref.WeakKeyDictionary()
        # One registry for the life of the process: counters survive a change of address.
        self.metrics = Metrics(self._cooling_down, self._cache_entries)
        self.access_log: AccessLog | None = None
        self.access_log_target: Path | Literal["-"] | None = None
        self.server: MetricsServer | None = None
        self.metrics_address: MetricsAddress | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening = False  # mitmproxy's running hook came: its proxy servers are up
        self._names = Names()
        self._names_of: object = None  # the rules `_names` were taken from

    def configure(self, updated: set[str]) -> None:
        # Only on its own options: an option another addon sets while a refused value is being rolled back
        # (Configuration's connection_strategy) would otherwise meet the refused settings still in force, and
        # refuse them again, and again.
        if not self.shared.configured or not updated & _OPTIONS:
            return
        self._note_loop()
        settings = self.shared.settings
        if settings.access_log != self.access_log_target:
            self._close_access_log()
            if settings.access_log is not None:
                try:
                    self.access_log = AccessLog.open(settings.access_log)
                except OSError as e:
                    raise exceptions.OptionsError(
                        f"ocigate_access_log: cannot open {settings.access_log}: {e.strerror or e}"
                    ) from None
            self.access_log_target = settings.access_log
        if settings.metrics != self.metrics_address:
            self._stop_server()
            if settings.metrics is not None:
                address = settings.metrics
                if self.worker is not None:
                    # Workers cannot share it: each scrape and probe must reach the worker it asks about.
                    try:
                        address = self.worker.metrics_address(address)
                    except ValueError as e:
                        raise exceptions.OptionsError(str(e)) from None
                try:
                    self.server = MetricsServer.start(address, self.metrics.registry, self.alive, self.ready)
                except OSError as e:
                    raise exceptions.OptionsError(
                        f"ocigate_metrics: cannot listen on {address}: {e.strerror or e}"
                    ) from None
                log.info("ocigate: metrics on http://%s/metrics", self.server.address)
            self.metrics_address = settings.metrics

    def running(self) -> None:
        self._note_loop()
        self._listening = True

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A replay (mitmproxy's client replay, askagain.Playback) sends the same flow again: it ends again, and is
        # logged and counted again.
        self.ended.discard(flow)
        self.passing.pop(flow, None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Around whatever stream hook the gateway gave a host's answer (streaming.Streams): what reaches the
        client is counted as it passes (passing.py)."""
        if flow.response is not None and flow in self.records:
            passing = around(flow.response)
            if passing is not None:
                self.passing[flow] = passing

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def done(self) -> None:
        # shared.stopping was set by Configuration, done first.
        self._close_access_log()
        self._stop_server()

    def _ended(self, flow: http.HTTPFlow) -> None:
        """Logs and counts a flow of the gateway's the first time it ends (a flow cut short in its response hook
        ends again with an error)."""
        record = self.records.get(flow)
        if record is None or flow in self.ended:
            return
        self.ended.add(flow)
        started = flow.request.timestamp_start
        record.bytes_sent = bytes_sent(flow.response, self.passing.pop(flow, None))
        record.duration = max(0.0, time.time() - started)
        record.publish(flow)
        if self.access_log is not None:
            written = line(record, started, None if self.worker is None else self.worker.index)
            if not self.access_log.write(written):
                self.metrics.access_log_dropped.inc()
        self.metrics.observe(observations(record, self._rule_names()))

    def _rule_names(self) -> Names:
        rules = self.shared.rules
        if rules is not self._names_of:
            self._names, self._names_of = Names.of(rules), rules
        return self._names

    def _note_loop(self) -> None:
        # Options are set before the loop runs too (ocigate's tests): the loop is noted once there is one.
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def _cooling_down(self) -> dict[str, bool]:
        """Every host the rules name and whether it is cooling down."""
        return self._on_loop(self._read_cooling_down)

    def _cache_entries(self) -> dict[str, int]:
        """How full each bounded cache is: tokens, pull contexts, host clients."""
        return self._on_loop(self._read_cache_entries)

    def alive(self) -> Verdict:
        """Liveness, asked on the metrics server's thread: whether the event loop, which serves every flow, runs a
        callback within LIVENESS_TIMEOUT (a thread that answers says nothing about a loop that is stuck)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return Verdict(False, "not alive: the event loop is not running")
        try:
            self._on_loop(lambda: None, LIVENESS_TIMEOUT)
        except TimeoutError:
            return Verdict(False, f"not alive: the event loop did not answer within {LIVENESS_TIMEOUT:g} s")
        except RuntimeError:  # it closed meanwhile
            return Verdict(False, "not alive: the event loop is not running")
        return Verdict(True, "alive")

    def ready(self) -> Verdict:
        """Readiness: the settings are parsed and in force (the rules read from them), the proxy listens, and the
        gateway is not shutting down (a load balancer sends new clients elsewhere meanwhile)."""
        if self.shared.stopping:
            return Verdict(False, "not ready: the gateway is shutting down")
        if not self.shared.configured:
            return Verdict(False, "not ready: the options have not been parsed")
        if not self._listening:
            return Verdict(False, "not ready: the proxy is not listening yet")
        return Verdict(True, "ready")

    def _on_loop(self, read: Callable[[], _T], timeout: float = _READ_TIMEOUT) -> _T:
        """`read()`, run on the event loop, whose hooks change what it reads (a scrape comes on the server's
        thread); TimeoutError when the loop has not run it within `timeout` seconds."""
        loop = self._loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is None or on_loop or not loop.is_running():
            return read()
        answer: Future[_T] = Future()

        def on_the_loop() -> None:
            try:
                answer.set_result(read())
            except Exception as e:
                answer.set_exception(e)

        loop.call_soon_threadsafe(on_the_loop)
        return answer.result(timeout=timeout)

    def _read_cache_entries(self) -> dict[str, int]:
        services = self.shared.services
        return {
            "tokens": len(services.broker.tokens),
            "pull_contexts": len(services.contexts),
            "host_clients": len(services.hostclient.clients),
        }

    def _read_cooling_down(self) -> dict[str, bool]:
        health = self.shared.health
        return {host: health.skipped(host) is not None for host in sorted(self._rule_names().hosts)}

    def _close_access_log(self) -> None:
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None
        self.access_log_target = None

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.metrics_address = None
