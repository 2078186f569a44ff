"""One of the processes `ocigate --workers N` runs (see workers.py; who it is, `workeridentity.py`): how it ends with
its parent, how its output names it, and how it shares the listening address with the other workers.

Each worker binds the proxy's address with SO_REUSEPORT: the kernel hands each new client connection to one of the
workers, and the connection stays there. A worker tells its parent once it listens (a queued real-time signal, which
names the sender), so that the parent knows a worker that fails at start from one that died later.
"""

import asyncio
import contextlib
import ctypes
import io
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

import mitmproxy_rs
from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.addons.proxyserver import Servers
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.mode_servers import AsyncioServerInstance

from .configuration import Shared
from .reuseport import keep_clients_together
from .workeridentity import LISTENING_SIGNAL, Identity

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Seconds a worker whose parent died has to stop before it is ended at once (os._exit): mitmproxy's clean stop ends
# the flows under way well within it.
STOP_GRACE = 30.0


def follow_parent(worker: Identity) -> None:
    """Ends this process (SIGTERM: mitmproxy stops cleanly) when its parent dies, however it died, so that no worker
    outlives it; exits now if the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    # Opened before the check below: if the parent is still there then, the pidfd is its own (the pid not reused).
    try:
        parent: int | None = os.pidfd_open(worker.parent)
    except OSError as e:  # a kernel before 5.3, a seccomp profile that refuses it: no watch on a hung shutdown
        _say(worker, f"cannot watch the parent (pid {worker.parent}): {e}; a worker that hangs as it stops stays up")
        parent = None
    # It died before PR_SET_PDEATHSIG was set: nobody would tell this worker.
    if worker.parent_gone():
        raise SystemExit(f"ocigate: {worker.label} the parent (pid {worker.parent}) is gone")
    if parent is None:
        return
    threading.Thread(
        target=end_if_hung,
        args=(partial(_wait_readable, parent), time.sleep, partial(_say, worker), os._exit),
        name="ocigate-follow-parent",
        daemon=True,
    ).start()


def end_if_hung(
    parent_gone: Callable[[], None],
    sleep: Callable[[float], None],
    say: Callable[[str], None],
    exit: Callable[[int], None],
) -> None:
    """Once `parent_gone` returns, gives this worker STOP_GRACE seconds to stop after the SIGTERM its parent's death
    sent, then ends it however far it got: a worker hung while stopping, with no parent left to kill it, would stay
    up forever. A daemon thread: a worker that stops in time ends it too."""
    parent_gone()
    sleep(STOP_GRACE)
    say(f"the parent is gone and this worker has not stopped within {STOP_GRACE:g} s: ending it now")
    exit(1)


def _wait_readable(fd: int) -> None:
    """Until a pidfd says its process has exited."""
    select.select([fd], [], [])


def _say(worker: Identity, text: str) -> None:
    # Straight to the file descriptor: sys.stderr's lock may be held by the very thread that hangs.
    os.write(2, f"{worker.label} ocigate: {text}\n".encode())


class LabelledLines(io.TextIOBase):
    """Text written to file descriptor `fd` as whole lines, each starting with `label`, every batch of lines by one
    write(2): the workers share one standard output (a terminal, a pipe to the journal), and lines written so are
    never cut into pieces that mix with another worker's."""

    encoding = "utf-8"

    def __init__(self, fd: int, label: str) -> None:
        super().__init__()
        self._fd = fd
        self._label = label
        self._partial = ""  # the start of a line not ended yet
        self._lock = threading.Lock()  # the access log's and the metrics server's threads may print too

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            if lines:
                data = "".join(f"{self._label} {line}\n" for line in lines).encode("utf-8", "backslashreplace")
                while data:
                    data = data[os.write(self._fd, data) :]
        return len(text)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)


def label_output(worker: Identity) -> None:
    """Standard output and error as LabelledLines: mitmproxy's log and flow lines, and ocigate's, name the worker."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        stream.flush()
        setattr(sys, name, LabelledLines(stream.fileno(), worker.label))


class SharedListen:
    """The addon of a worker: refuses what N processes cannot share, makes mitmproxy's proxy servers bind with
    SO_REUSEPORT, and tells the parent once they listen."""

    def __init__(self, worker: Identity, shared: Shared) -> None:
        self.worker = worker
        self.shared = shared
        self._servers: Servers | None = None

    def load(self, loader: Loader) -> None:
        proxyserver = loader.master.addons.get("proxyserver")
        if proxyserver is not None:
            self._servers = proxyserver.servers
            # Sent with the servers made and not yet started (mitmproxy's Servers.update).
            proxyserver.servers.changed.connect(self._share)

    def configure(self, updated: set[str]) -> None:
        options = ctx.options
        for name, what in (("save_stream_file", "one capture (-w)"), ("hardump", "one HAR file")):
            if name in updated and name in options and getattr(options, name):
                raise exceptions.OptionsError(
                    f"{name}: the {self.worker.count} workers of ocigate --workers cannot write {what}; "
                    "capture with a single worker (--workers 1)"
                )
        if updated & {"mode", "listen_port"}:
            for spec in options.mode:
                mode = mode_specs.ProxyMode.parse(spec)
                port = mode.listen_port(options.listen_port)
                if mode.transport_protocol != "tcp" or port is None:
                    raise exceptions.OptionsError(
                        f"mode: {spec} cannot be shared by the workers of ocigate --workers (only modes listening "
                        "on a TCP port can)"
                    )
                if port == 0:
                    raise exceptions.OptionsError(
                        "listen_port: 0 would give each worker of ocigate --workers a port of its own; name one"
                    )

    def running(self) -> None:
        # A parent gone meanwhile has sent this worker SIGTERM already (follow_parent).
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.worker.parent, LISTENING_SIGNAL)

    def _share(self) -> None:
        for instance in self._servers or ():
            if isinstance(instance, AsyncioServerInstance) and not instance.is_running:
                # mitmproxy's listen has no way to ask for SO_REUSEPORT: this instance's, for TCP (what configure
                # lets through), is asyncio's with it.
                instance.listen = partial(self._listen, instance)  # type: ignore[method-assign]

    async def _listen(
        self, instance: AsyncioServerInstance, host: str, port: int
    ) -> list[asyncio.Server | mitmproxy_rs.udp.UdpServer | mitmproxy_rs.wireguard.WireGuardServer]:
        server = await asyncio.start_server(instance.handle_stream, host, port, reuse_port=True)
        if self.shared.configured and self.shared.settings.worker_affinity == "client":
            try:
                for sock in server.sockets:
                    keep_clients_together(sock, self.worker.count)
            except OSError as e:
                server.close()
                raise OSError(e.errno, f"ocigate_worker_affinity=client: the kernel refused its program: {e}") from e
        return [server]
