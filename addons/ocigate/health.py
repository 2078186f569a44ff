"""What ocigate has learned about hosts' health: hosts that could not be reached are skipped for a cool-down, so
that the requests after the first do not wait for them again; content a host sent wrong is not asked of it again,
and content a host failed to send (an error or a broken transfer after it said it had it) not for a cool-down.

A host in cool-down is not probed in the background: the first request after the cool-down asks it again, and
either it answers (and is well again) or it starts another cool-down.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache, TTLCache

DEFAULT_COOLDOWN = 30.0
# How long a host that sent bytes not matching their digest is not asked for that digest again.
BAD_CONTENT_TTL = 3600.0
# Hosts remembered as down, and (host, digest) pairs as sent wrong or failed, the least recently noted forgotten first:
# a forgotten host or digest is only asked again.
MAX_DOWN_HOSTS = 1024
MAX_BAD_CONTENT = 10_000


@dataclass(frozen=True)
class _Down:
    why: str
    until: float


class HostHealth:
    def __init__(self, cooldown: float = DEFAULT_COOLDOWN, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown = cooldown
        self._clock = clock
        self._down: LRUCache[str, _Down] = LRUCache(MAX_DOWN_HOSTS)
        self._bad_content: TTLCache[tuple[str, str], str] = TTLCache(MAX_BAD_CONTENT, BAD_CONTENT_TTL, timer=clock)
        self._failed: TTLCache[tuple[str, str], _Down] = TTLCache(MAX_BAD_CONTENT, BAD_CONTENT_TTL, timer=clock)

    def with_cooldown(self, cooldown: float) -> "HostHealth":
        """What is known of hosts, under another cool-down (the options changed): nothing learned is forgotten, and
        what a request still under way finds out lands here too."""
        health = HostHealth(cooldown, self._clock)
        health._down, health._bad_content, health._failed = self._down, self._bad_content, self._failed
        return health

    def unreachable(self, host: str, why: str) -> None:
        """`host` (its URL) could not be connected to or did not answer in time."""
        if self.cooldown > 0:
            self._down[host] = _Down(why, self._clock() + self.cooldown)

    def answered(self, host: str) -> None:
        self._down.pop(host, None)

    def skipped(self, host: str) -> str | None:
        """Why `host` is not to be asked now, e.g. "connection refused (skipped for 27 s)"; None when it may be."""
        return self._still(self._down.get(host))

    def _still(self, down: _Down | None) -> str | None:
        """Why, and for how long yet, when `down` has not run out; None when it has (or there is none)."""
        left = down.until - self._clock() if down else 0
        if down is None or left <= 0:
            return None
        return f"{down.why} (skipped for {max(1, round(left))} s)"

    def bad_content(self, host: str, digest: str, why: str) -> None:
        """`host` sent something else than `digest` for it."""
        self._bad_content[(host, digest)] = why

    def sent_bad(self, host: str, digest: str) -> str | None:
        return self._bad_content.get((host, digest))

    def failed(self, host: str, digest: str, why: str) -> bool:
        """`host` failed to send `digest` (an error status, a broken transfer): it is not asked for it during a
        cool-down. False when there is no cool-down (0), so nothing was marked."""
        if self.cooldown <= 0:
            return False
        self._failed[(host, digest)] = _Down(why, self._clock() + self.cooldown)
        return True

    def failed_lately(self, host: str, digest: str) -> str | None:
        """Why `host` is not to be asked for `digest` now, after it failed to send it; None when it may be."""
        still = self._still(self._failed.get((host, digest)))
        return f"failed to send it: {still}" if still else None
