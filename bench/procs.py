"""What the proxies cost the machine, read from /proc: a process and every process under it (a gateway's workers),
their summed memory and CPU time."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")


def process_tree(pid: int, proc: Path = PROC) -> list[int]:
    """`pid` and its descendants that are alive, parents first (from /proc/<pid>/task/<tid>/children)."""
    found: list[int] = []
    waiting = [pid]
    while waiting:
        current = waiting.pop(0)
        if current in found or not (proc / str(current)).exists():
            continue
        found.append(current)
        for children in (proc / str(current) / "task").glob("*/children"):
            try:
                waiting += [int(child) for child in children.read_text().split()]
            except OSError:
                continue  # the thread or the process ended meanwhile
    return found


def status_kib(status_text: str, field_name: str) -> int | None:
    """A "Name:   1234 kB" field of /proc/<pid>/status, in KiB; None when absent (a zombie has no VmHWM)."""
    for line in status_text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def cpu_ticks(stat_text: str) -> int:
    """utime + stime of a /proc/<pid>/stat line, in clock ticks. The command name (field 2) may hold spaces and
    parentheses, so the fields are counted after its closing parenthesis."""
    fields = stat_text[stat_text.rindex(")") + 2 :].split()
    # After the name: state is field 3, utime field 14, stime field 15.
    return int(fields[11]) + int(fields[12])


def summed_memory_mib(pids: Iterable[int], field_name: str, proc: Path = PROC) -> float:
    """VmHWM (peak) or VmRSS summed over processes, in MiB; processes gone meanwhile count nothing."""
    total = 0
    for pid in pids:
        try:
            total += status_kib((proc / str(pid) / "status").read_text(), field_name) or 0
        except OSError:
            continue
    return total / 1024


def cpu_seconds(pids: Iterable[int], proc: Path = PROC) -> float:
    total = 0
    for pid in pids:
        try:
            total += cpu_ticks((proc / str(pid) / "stat").read_text())
        except OSError:
            continue
    return total / os.sysconf("SC_CLK_TCK")
