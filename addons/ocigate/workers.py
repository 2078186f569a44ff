"""`ocigate --workers N`: N gateway processes on one box that share one listening address (SO_REUSEPORT, see
worker.py), one CA (mitmproxy's confdir) and one rules tree, started and watched by one parent process. The parent only
starts and signals processes: what it does when is supervisor.py's.

The parent waits for events with sigtimedwait, its signals blocked: a worker's exit (SIGCHLD), a worker listening
(workeridentity.LISTENING_SIGNAL), SIGTERM, SIGINT or SIGHUP, or the time of a restart; it never polls. Each worker
runs the gateway with the same arguments (`python -m ocigate.cli`, the same interpreter and code), its environment
saying which worker it is, and ends when the parent does (worker.follow_parent), within worker.STOP_GRACE even if it
hangs while stopping.
"""

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from .supervisor import STOP_SIGNALS, Supervisor
from .workeridentity import LISTENING_SIGNAL, Identity

OPTION = "--workers"


def split(argv: Sequence[str]) -> tuple[int, list[str]]:
    """The number of workers `argv` asks for (1 when it does not) and the rest of it, for the gateway; SystemExit
    naming the problem."""
    count: int | None = None
    rest: list[str] = []
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == OPTION or word.startswith(f"{OPTION}="):
            if count is not None:
                raise SystemExit(f"ocigate: {OPTION} is given twice")
            value = word.partition("=")[2] if "=" in word else (words.pop(0) if words else "")
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"ocigate: {OPTION} needs a number of gateway processes, 1 or more (not {value!r})")
            count = int(value)
        else:
            rest.append(word)
    return count or 1, rest


def _say(text: str) -> None:
    print(f"ocigate: {text}", file=sys.stderr, flush=True)


def run(count: int, arguments: Sequence[str]) -> int:
    """Runs `count` workers with the gateway's `arguments` until they have all exited; the exit status."""
    if not sys.platform.startswith("linux"):
        raise SystemExit(f"ocigate: {OPTION} needs Linux (SO_REUSEPORT sharing out connections, PR_SET_PDEATHSIG)")
    waited_for = {signal.SIGCHLD, LISTENING_SIGNAL, *STOP_SIGNALS}
    # Blocked, they wait for sigtimedwait below; each worker starts with none blocked (setsigmask).
    signal.pthread_sigmask(signal.SIG_BLOCK, waited_for)
    # -P: nothing from the working directory is imported in place of ocigate.
    command = [sys.executable, "-P", "-m", "ocigate.cli", *arguments]

    def spawn(index: int) -> int:
        environment = os.environ | Identity(index, count, os.getpid()).environment()
        # Signals the parent was started ignoring (nohup, a shell's background job) are not ignored by the workers:
        # a stop forwarded to them must stop them.
        return os.posix_spawn(sys.executable, command, environment, setsigmask=(), setsigdef=waited_for)

    supervisor = Supervisor(count, spawn, os.kill, time.monotonic, _say)
    _say(f"starting {count} workers (worker 0 first, the others once it listens)")
    supervisor.start()
    while not supervisor.done:
        timeout = supervisor.timeout()
        if timeout is None:
            event: signal.struct_siginfo | None = signal.sigwaitinfo(waited_for)
        else:
            event = signal.sigtimedwait(waited_for, timeout)
        handle(supervisor, event, _pending_listening, _reap)
        supervisor.tick()
    return supervisor.exit_status


def handle(
    supervisor: Supervisor,
    event: signal.struct_siginfo | None,
    pending_listening: Callable[[], int | None],
    reap: Callable[[], list[tuple[int, int]]],
) -> None:
    """Tells `supervisor` of `event` (None: a restart is due). `pending_listening`: the pid of a worker whose
    LISTENING_SIGNAL is pending, taking it (None when none is); `reap`: the children that have exited."""
    if event is None:
        return
    if event.si_signo == signal.SIGCHLD:
        # sigwaitinfo hands pending signals lowest number first, SIGCHLD before LISTENING_SIGNAL (SIGRTMIN): a worker
        # that said it listens and died at once would be judged to have died before it listened, stopping the gateway.
        while (pid := pending_listening()) is not None:
            supervisor.listening(pid)
        for pid, code in reap():
            supervisor.exited(pid, code)
    elif event.si_signo == LISTENING_SIGNAL:
        supervisor.listening(event.si_pid)
    else:
        supervisor.signalled(signal.Signals(event.si_signo))


def _pending_listening() -> int | None:
    event = signal.sigtimedwait({LISTENING_SIGNAL}, 0)
    return None if event is None else event.si_pid


def _reap() -> list[tuple[int, int]]:
    """Every child that has exited, with its exit code (negative: the signal that killed it); SIGCHLDs that came
    together are one."""
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped.append((pid, os.waitstatus_to_exitcode(status)))
    return reaped
