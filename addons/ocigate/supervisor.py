"""What the parent of `ocigate --workers N` decides: when a worker is started again, when the gateway stops, and with
which exit status. Pure: it is told what happened (a worker exited, listened, a signal came, time passed) and acts
through what it is given (start a worker, signal one), so that every path can be tested without processes.

Worker 0 starts first, the others once it listens: the first start of mitmproxy writes its CA to the confdir, and
workers starting together would each write a CA of their own. An option that is wrong is then said once, by worker 0.

The policy, for systemd (Restart=on-failure restarts the whole gateway):
- A worker that exits before it ever listened (bad options, the address in use, a rules tree that does not load) ends
  the gateway, as a single `ocigate` would end: the others are stopped and the parent exits with that worker's status.
- A worker that dies after it listened is started again, after a back-off (1 s, doubling up to 30 s while it keeps
  dying soon after it started; back to 1 s once one has run for a minute), each time logged with its exit status. The
  other workers serve meanwhile.
- SIGTERM, SIGINT and SIGHUP are passed on to every worker; the parent exits once all have exited (0 when each ended
  cleanly or of that signal, else 1). A second such signal while they stop is passed on too (a worker draining, see
  draining.py, then stops at once, cleanly); a third kills them (SIGKILL).
"""

import signal
from collections.abc import Callable
from dataclasses import dataclass, field

FIRST_DELAY = 1.0
MAX_DELAY = 30.0
# A worker that ran this long before it died was not failing at start: its next restart waits FIRST_DELAY again.
STABLE_AFTER = 60.0
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def describe(code: int) -> str:
    """An exit code as os.waitstatus_to_exitcode gives it (negative: the signal that ended the process), in words."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@dataclass
class Slot:
    """Worker `index`: the process running as it now (pid None while it waits to be started again)."""

    index: int
    pid: int | None = None
    started: float = 0.0
    ever_listened: bool = False  # a process of this slot said it listens, since the gateway started
    restarts_in_a_row: int = 0  # restarts of workers that died soon after they started
    restart_at: float | None = None


@dataclass
class Supervisor:
    count: int
    spawn: Callable[[int], int]  # starts worker `index`, returns its pid
    kill: Callable[[int, int], None]  # sends signal to pid
    clock: Callable[[], float]  # monotonic seconds
    say: Callable[[str], None]
    slots: list[Slot] = field(init=False)
    stopping: signal.Signals | None = field(default=None, init=False)
    signals_while_stopping: int = field(default=0, init=False)  # stop signals that came after the first
    status: int | None = field(default=None, init=False)  # the exit status, once decided

    def __post_init__(self) -> None:
        self.slots = [Slot(index) for index in range(self.count)]

    def start(self) -> None:
        self._start(self.slots[0])

    @property
    def done(self) -> bool:
        """Every worker has exited and none is to be started again: the parent exits with `exit_status`."""
        return all(slot.pid is None and slot.restart_at is None for slot in self.slots)

    @property
    def exit_status(self) -> int:
        return self.status or 0

    def timeout(self) -> float | None:
        """Seconds until the next restart is due; None when none is."""
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        return max(0.0, min(due) - self.clock()) if due else None

    def listening(self, pid: int) -> None:
        slot = self._slot_of(pid)
        if slot is None or slot.ever_listened:
            return
        slot.ever_listened = True
        if self.stopping is None and all(other.ever_listened for other in self.slots):
            # Once: from here on a worker that dies is started again rather than ending the gateway.
            self.say(f"all {len(self.slots)} workers listen")
        if slot.index == 0 and self.stopping is None:
            for other in self.slots[1:]:
                if other.pid is None and other.restart_at is None:
                    self._start(other)

    def exited(self, pid: int, code: int) -> None:
        """Worker `pid` ended with `code` (negative: killed by that signal)."""
        slot = self._slot_of(pid)
        if slot is None:
            return
        slot.pid = None
        name = f"worker {slot.index} (pid {pid})"
        if self.stopping is not None:
            if code not in (0, -self.stopping):
                self.say(f"{name} {describe(code)} while stopping")
                self.status = self.status or 1
            return
        if not slot.ever_listened:
            # Status 0: it had nothing to serve (--version, --options), as one gateway would have.
            if code != 0:
                self.say(f"{name} {describe(code)} before it listened: stopping the gateway")
            self.status = code if code >= 0 else 1
            self._stop(signal.SIGTERM)
            return
        ran = self.clock() - slot.started
        slot.restarts_in_a_row = 0 if ran >= STABLE_AFTER else slot.restarts_in_a_row + 1
        delay = min(MAX_DELAY, FIRST_DELAY * 2 ** max(0, slot.restarts_in_a_row - 1))
        slot.restart_at = self.clock() + delay
        self.say(f"{name} {describe(code)} after {ran:.0f} s; starting it again in {delay:g} s")

    def tick(self) -> None:
        """Starts the workers whose restart is due."""
        now = self.clock()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)

    def signalled(self, signum: signal.Signals) -> None:
        if signum not in STOP_SIGNALS:
            return
        if self.stopping is None:
            self.say(f"{signum.name}: stopping the workers")
            self._stop(signum)
            return
        self.signals_while_stopping += 1
        if self.signals_while_stopping == 1:
            self.say(f"{signum.name} again: passing it on (a worker draining stops at once); another kills them")
            self._signal_workers(signum)
        else:
            self.say(f"{signum.name} again: killing the workers")
            self._signal_workers(signal.SIGKILL)

    def _stop(self, signum: signal.Signals) -> None:
        self.stopping = signum
        for slot in self.slots:
            slot.restart_at = None
        self._signal_workers(signum)

    def _signal_workers(self, signum: signal.Signals) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                self.kill(slot.pid, signum)

    def _start(self, slot: Slot) -> None:
        slot.restart_at = None
        slot.started = self.clock()
        try:
            slot.pid = self.spawn(slot.index)
        except OSError as e:  # no process to be had now (EAGAIN, ENOMEM): the others go on serving
            slot.pid = None
            if not slot.ever_listened:
                self.say(f"worker {slot.index} cannot be started ({e}): stopping the gateway")
                self.status = self.status or 1
                self._stop(signal.SIGTERM)
                return
            slot.restarts_in_a_row += 1
            delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (slot.restarts_in_a_row - 1))
            slot.restart_at = self.clock() + delay
            self.say(f"worker {slot.index} cannot be started ({e}); trying again in {delay:g} s")

    def _slot_of(self, pid: int) -> Slot | None:
        return next((slot for slot in self.slots if slot.pid == pid), None)
