"""Host health: cool-downs after failures to connect, and content a host sent wrong."""

from ocigate.health import MAX_DOWN_HOSTS, HostHealth

HOST = "http://mirror.test:5000/v2"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_unreachable_host_is_skipped_for_the_cool_down_then_asked_again() -> None:
    clock = Clock()
    health = HostHealth(cooldown=30, clock=clock)
    assert health.skipped(HOST) is None
    health.unreachable(HOST, "connection refused")
    assert health.skipped(HOST) == "connection refused (skipped for 30 s)"
    clock.now += 29.4
    assert health.skipped(HOST) == "connection refused (skipped for 1 s)"
    clock.now += 1
    assert health.skipped(HOST) is None


def test_an_answer_ends_the_cool_down_and_zero_turns_it_off() -> None:
    health = HostHealth(cooldown=30, clock=Clock())
    health.unreachable(HOST, "timed out")
    health.answered(HOST)
    assert health.skipped(HOST) is None
    off = HostHealth(cooldown=0, clock=Clock())
    off.unreachable(HOST, "timed out")
    assert off.skipped(HOST) is None


def test_bad_content_is_remembered_per_host_and_digest() -> None:
    health = HostHealth(clock=Clock())
    health.bad_content(HOST, "sha256:" + "a" * 64, "3 bytes that hash to sha256:...")
    assert health.sent_bad(HOST, "sha256:" + "a" * 64) == "3 bytes that hash to sha256:..."
    assert health.sent_bad(HOST, "sha256:" + "b" * 64) is None
    assert health.sent_bad("http://other.test/v2", "sha256:" + "a" * 64) is None


def test_at_most_max_down_hosts_are_remembered_the_latest_kept() -> None:
    health = HostHealth(cooldown=30, clock=Clock())
    hosts = [f"http://mirror{number}.test/v2" for number in range(5000)]
    for host in hosts:
        health.unreachable(host, "connection refused")
    down = [host for host in hosts if health.skipped(host)]
    assert down == hosts[-MAX_DOWN_HOSTS:]
