"""CPU seconds (user + system) of a process and its live descendants, from Linux /proc."""

from __future__ import annotations

import os


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:  # exited meanwhile
        return None
    return text[text.rindex(")") + 2:].split()  # fields after the command name


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of `root` and every live descendant (all their threads), in seconds."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(int(name))) is not None:
            parents[int(name)] = int(fields[1])  # ppid
            times[int(name)] = int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0)
        stack.extend(child for child, parent in parents.items() if parent == pid)
    return total / os.sysconf("SC_CLK_TCK")
