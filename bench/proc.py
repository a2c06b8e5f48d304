"""Process accounting read straight from /proc, so the harness needs no agent inside the servers.

CPU is utime + stime of a process and all its live descendants (uvicorn's `--workers` children, npm
wrappers). A descendant that exits mid-window takes its ticks with it; servers under test keep their
workers for the whole run, so that loss does not occur in practice.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile_limit() -> int:
    """Lift the soft open-files limit to the hard one; children inherit it. Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine_ticks() -> tuple[int, int]:
    """(all CPU ticks, stolen ticks) of the machine since boot, from /proc/stat's `cpu` line.

    Steal is time the hypervisor ran something else while this VM wanted the CPU: on a shared host it can slow
    every process here at once, which no measurement inside the VM would otherwise show.
    """
    with open("/proc/stat") as f:
        fields = [int(value) for value in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[0] - before[0]
    return 100.0 * (after[1] - before[1]) / total if total > 0 else 0.0


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses; everything after the last ')' is fixed-format.
    return raw[raw.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (fields 14 and 15 of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # After the ')' the state is index 0, so utime/stime (fields 14/15) sit at 11/12.
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def tree_cpu_seconds(pid: int) -> float:
    return cpu_seconds(process_tree(pid))


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def tree_rss_bytes(pid: int) -> int:
    return rss_bytes(process_tree(pid))


def self_cpu_seconds() -> float:
    """CPU of this process (resource.getrusage), comparable with the /proc figures above."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class CpuWindow:
    """CPU seconds a process tree spent between start() and stop()."""

    pid: int
    _start: float = 0.0
    seconds: float = 0.0

    def start(self) -> None:
        self._start = tree_cpu_seconds(self.pid)

    def stop(self) -> float:
        self.seconds = tree_cpu_seconds(self.pid) - self._start
        return self.seconds
