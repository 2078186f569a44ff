"""What the parent of `ocigate --workers N` does when workers start, listen, die, and when it is signalled: with
processes and time made up."""

import signal

import pytest

from ocigate.supervisor import FIRST_DELAY, MAX_DELAY, STABLE_AFTER, Supervisor, describe
from ocigate.workeridentity import LISTENING_SIGNAL
from ocigate.workers import handle


class Box:
    """Made-up processes and a made-up clock for a Supervisor."""

    def __init__(self, count: int) -> None:
        self.now = 1000.0
        self.next_pid = 100
        self.started: list[tuple[int, int]] = []  # (index, pid)
        self.signals: list[tuple[int, int]] = []  # (pid, signal)
        self.said: list[str] = []
        self.supervisor = Supervisor(count, self.spawn, self.kill, lambda: self.now, self.said.append)

    def spawn(self, index: int) -> int:
        self.next_pid += 1
        self.started.append((index, self.next_pid))
        return self.next_pid

    def kill(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))

    def pid_of(self, index: int) -> int:
        pid = self.supervisor.slots[index].pid
        assert pid is not None
        return pid

    def all_listening(self) -> None:
        self.supervisor.start()
        self.supervisor.listening(self.pid_of(0))
        for slot in self.supervisor.slots[1:]:
            assert slot.pid is not None
            self.supervisor.listening(slot.pid)

    def later(self, seconds: float) -> None:
        self.now += seconds
        self.supervisor.tick()


def test_worker_0_starts_alone_and_the_others_once_it_listens() -> None:
    box = Box(3)
    box.supervisor.start()
    assert [index for index, _ in box.started] == [0]
    box.supervisor.listening(box.pid_of(0))
    assert [index for index, _ in box.started] == [0, 1, 2]
    box.supervisor.listening(box.pid_of(0))  # said again: nothing more is started
    assert len(box.started) == 3


def test_the_gateway_says_once_when_every_worker_listens_and_not_again_for_a_restarted_one() -> None:
    """The point from which a worker that dies is started again: the tests' and an operator's sign of it."""
    box = Box(3)
    box.supervisor.start()
    box.supervisor.listening(box.pid_of(0))
    box.supervisor.listening(box.pid_of(2))
    assert box.said == []
    box.supervisor.listening(box.pid_of(1))
    assert box.said == ["all 3 workers listen"]
    box.now += 60
    box.supervisor.exited(box.pid_of(1), -signal.SIGKILL)
    box.later(FIRST_DELAY)
    box.supervisor.listening(box.pid_of(1))
    assert box.said[0] == "all 3 workers listen" and box.said.count("all 3 workers listen") == 1


def test_a_worker_that_exits_before_it_listened_ends_the_gateway_with_its_status() -> None:
    box = Box(2)
    box.supervisor.start()
    box.supervisor.exited(box.pid_of(0), 1)
    assert box.supervisor.done and box.supervisor.exit_status == 1
    assert [index for index, _ in box.started] == [0]  # the others were never started
    assert box.said == ["worker 0 (pid 101) exited with status 1 before it listened: stopping the gateway"]


def test_a_worker_0_that_ends_cleanly_before_it_listened_ends_the_gateway_cleanly() -> None:
    """--version, --options: it had nothing to serve."""
    box = Box(2)
    box.supervisor.start()
    box.supervisor.exited(box.pid_of(0), 0)
    assert box.supervisor.done and box.supervisor.exit_status == 0 and box.said == []


def test_when_a_later_worker_fails_at_start_the_running_ones_are_stopped() -> None:
    box = Box(2)
    box.supervisor.start()
    box.supervisor.listening(box.pid_of(0))
    first, second = box.pid_of(0), box.pid_of(1)
    box.supervisor.exited(second, -signal.SIGSEGV)
    assert box.signals == [(first, signal.SIGTERM)]
    assert not box.supervisor.done
    box.supervisor.exited(first, 0)
    assert box.supervisor.done and box.supervisor.exit_status == 1


def test_a_worker_that_dies_after_it_listened_is_started_again_after_a_back_off_and_the_others_keep_serving() -> None:
    box = Box(2)
    box.all_listening()
    dead = box.pid_of(1)
    box.now += 5
    box.supervisor.exited(dead, -signal.SIGKILL)
    assert box.said == [
        "all 2 workers listen",
        "worker 1 (pid 102) was killed by SIGKILL after 5 s; starting it again in 1 s",
    ]
    assert box.supervisor.timeout() == FIRST_DELAY
    assert box.signals == [] and not box.supervisor.done
    box.later(FIRST_DELAY / 2)
    assert len(box.started) == 2
    box.later(FIRST_DELAY / 2)
    assert box.started[-1] == (1, 103) and box.supervisor.timeout() is None


def test_the_back_off_doubles_while_a_worker_keeps_dying_soon_and_starts_over_after_one_ran_a_while() -> None:
    box = Box(1)
    box.all_listening()
    delays = []
    for _ in range(8):
        box.supervisor.exited(box.pid_of(0), 1)
        delay = box.supervisor.timeout()
        assert delay is not None
        delays.append(delay)
        box.later(delay)
    assert delays == [1, 2, 4, 8, 16, MAX_DELAY, MAX_DELAY, MAX_DELAY]
    box.now += STABLE_AFTER
    box.supervisor.exited(box.pid_of(0), 1)
    assert box.supervisor.timeout() == FIRST_DELAY


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_is_passed_to_every_worker_and_the_parent_exits_once_all_have(signum: signal.Signals) -> None:
    box = Box(3)
    box.all_listening()
    pids = [box.pid_of(index) for index in range(3)]
    box.supervisor.signalled(signum)
    assert box.signals == [(pid, signum) for pid in pids]
    box.supervisor.exited(pids[0], 0)
    box.supervisor.exited(pids[1], -signum)  # ended by the signal itself: clean too
    assert not box.supervisor.done
    box.supervisor.exited(pids[2], 0)
    assert box.supervisor.done and box.supervisor.exit_status == 0
    assert len(box.started) == 3  # none started again


def test_a_worker_failing_while_the_gateway_stops_makes_the_exit_status_1() -> None:
    box = Box(2)
    box.all_listening()
    box.supervisor.signalled(signal.SIGTERM)
    box.supervisor.exited(box.pid_of(0), 3)
    box.supervisor.exited(box.pid_of(1), 0)
    assert box.supervisor.done and box.supervisor.exit_status == 1
    assert box.said[-1] == "worker 0 (pid 101) exited with status 3 while stopping"


def test_a_restart_that_is_due_is_not_made_once_the_gateway_stops() -> None:
    box = Box(2)
    box.all_listening()
    box.supervisor.exited(box.pid_of(1), 1)
    box.supervisor.signalled(signal.SIGTERM)
    assert box.supervisor.timeout() is None
    box.supervisor.exited(box.pid_of(0), 0)
    box.later(MAX_DELAY)
    assert len(box.started) == 2 and box.supervisor.done


def test_a_second_stop_signal_is_passed_on_and_a_third_kills_the_workers_left() -> None:
    box = Box(2)
    box.all_listening()
    box.supervisor.signalled(signal.SIGTERM)
    box.supervisor.exited(box.pid_of(0), 0)
    left = box.pid_of(1)
    # A worker draining stops at once on the second: cleanly, so the gateway's status is still 0.
    box.supervisor.signalled(signal.SIGINT)
    assert box.signals[-1] == (left, signal.SIGINT)
    box.supervisor.signalled(signal.SIGINT)
    assert box.signals[-1] == (left, signal.SIGKILL)
    assert box.said[-2:] == [
        "SIGINT again: passing it on (a worker draining stops at once); another kills them",
        "SIGINT again: killing the workers",
    ]


def test_other_signals_and_unknown_children_change_nothing() -> None:
    box = Box(1)
    box.all_listening()
    box.said.clear()
    box.supervisor.signalled(signal.SIGUSR2)
    box.supervisor.exited(99999, 1)
    box.supervisor.listening(99999)
    assert box.signals == [] and box.said == [] and not box.supervisor.done


def test_an_exit_code_is_said_in_words() -> None:
    assert describe(0) == "exited with status 0"
    assert describe(2) == "exited with status 2"
    assert describe(-9) == "was killed by SIGKILL"


def test_a_worker_that_cannot_be_started_again_is_tried_again_later_and_the_others_keep_serving() -> None:
    box = Box(2)
    box.all_listening()
    box.now += 100
    box.supervisor.exited(box.pid_of(1), 1)
    refusing = box.spawn

    def no_process(index: int) -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    box.supervisor.spawn = no_process
    box.later(FIRST_DELAY)
    assert box.said[-1] == (
        "worker 1 cannot be started ([Errno 11] Resource temporarily unavailable); trying again in 1 s"
    )
    assert box.signals == [] and not box.supervisor.done and box.supervisor.timeout() == FIRST_DELAY
    box.supervisor.spawn = refusing
    box.later(FIRST_DELAY)
    assert box.supervisor.slots[1].pid is not None


def test_a_worker_that_cannot_be_started_at_all_stops_the_gateway() -> None:
    box = Box(2)

    def no_process(index: int) -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    box.supervisor.spawn = no_process
    box.supervisor.start()
    assert box.supervisor.done and box.supervisor.exit_status == 1


def siginfo(signo: int, pid: int) -> signal.struct_siginfo:
    return signal.struct_siginfo((signo, 0, 0, pid, 0, 0, 0))


def test_a_worker_that_said_it_listens_and_died_at_once_is_started_again_not_taken_for_a_failed_start() -> None:
    box = Box(2)
    box.supervisor.start()
    pid = box.pid_of(0)
    # Both signals pending: sigwaitinfo hands SIGCHLD (the lower number) first, the listening signal still queued.
    pending = [pid]
    handle(box.supervisor, siginfo(signal.SIGCHLD, pid), lambda: pending.pop() if pending else None, lambda: [(pid, 1)])
    assert pending == []
    assert box.supervisor.stopping is None and box.supervisor.slots[0].restart_at is not None
    assert [index for index, _ in box.started] == [0, 1]  # worker 1 started, as after any worker 0 that listened


def test_a_listening_signal_or_a_stop_signal_alone_goes_to_the_supervisor() -> None:
    box = Box(2)
    box.supervisor.start()
    nothing_pending: list[int] = []
    handle(box.supervisor, siginfo(LISTENING_SIGNAL, box.pid_of(0)), lambda: None, nothing_pending.copy)
    assert [index for index, _ in box.started] == [0, 1]
    handle(box.supervisor, siginfo(signal.SIGTERM, 1), lambda: None, nothing_pending.copy)
    assert box.supervisor.stopping == signal.SIGTERM
