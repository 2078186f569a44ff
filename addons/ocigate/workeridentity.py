"""Which worker of `ocigate --workers N` a process is (its environment says, as the parent set it) and the signal a
worker tells its parent it listens with: what the parent (workers.py) and each worker (worker.py) both need.

Apart from worker.py because the parent imports it: the parent only starts and signals processes, and imports neither
mitmproxy nor the gateway (tests/test_workers.py checks), which would cost it as much memory as a worker.
"""

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # settings.py imports mitmproxy; a MetricsAddress is only ever handed in by a worker
    from .settings import MetricsAddress

ENVIRONMENT = "OCIGATE_WORKER"  # INDEX/COUNT/PARENT_PID, set by the parent for each worker
# Real-time signals are queued and carry the sender's pid: workers saying so at once are each heard.
LISTENING_SIGNAL = signal.SIGRTMIN


@dataclass(frozen=True)
class Identity:
    index: int  # 0 .. count - 1
    count: int
    parent: int  # the parent's pid

    def parent_gone(self) -> bool:
        """Whether the parent that started this worker is gone (the worker was handed to another process)."""
        return os.getppid() != self.parent

    @property
    def label(self) -> str:
        return f"[w{self.index}]"

    def environment(self) -> dict[str, str]:
        return {ENVIRONMENT: f"{self.index}/{self.count}/{self.parent}"}

    @classmethod
    def from_environment(cls, environment: Mapping[str, str]) -> "Identity | None":
        """The worker this process is; None for a gateway alone. ValueError when the variable is not the parent's."""
        value = environment.get(ENVIRONMENT)
        if value is None:
            return None
        parts = value.split("/")
        if len(parts) != 3 or not all(part.isdigit() for part in parts):
            raise ValueError(f"{ENVIRONMENT}={value!r} is not INDEX/COUNT/PARENT_PID")
        index, count, parent = map(int, parts)
        if index >= count:
            raise ValueError(f"{ENVIRONMENT}={value!r}: worker {index} of {count}")
        return cls(index, count, parent)

    def metrics_address(self, address: "MetricsAddress") -> "MetricsAddress":
        """Where this worker serves the metrics and probes: the port given plus its index (0: a free port each)."""
        if address.port == 0:
            return address
        port = address.port + self.index
        if port > 65535:
            raise ValueError(f"ocigate_metrics: worker {self.index} would serve on port {port}, above 65535")
        return replace(address, port=port)
