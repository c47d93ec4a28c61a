"""How long this process has run, from the kernel's record of its start (Linux /proc)."""

from __future__ import annotations

import os
import time

START_TIME_FIELD = 22  # proc(5): /proc/pid/stat field 22, starttime, in clock ticks since boot


def process_uptime_s(stat_path: str = "/proc/self/stat") -> float | None:
    """Seconds since this process started: CLOCK_BOOTTIME now less the process's start time,
    both counted from boot (proc(5), clock_gettime(2)), so interpreter start-up and imports
    before any of our code ran are included. Resolution: one clock tick (10 ms at the usual
    USER_HZ of 100). None where there is no Linux /proc or no CLOCK_BOOTTIME; ValueError when
    the file is not in proc(5)'s format.
    """
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return None
    try:
        with open(stat_path, encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    # Field 2, the command name in parentheses, may itself hold spaces and ')': fields 3 onwards
    # follow the last ')'.
    after_name = text.rpartition(")")[2].split()
    field = after_name[START_TIME_FIELD - 3] if len(after_name) > START_TIME_FIELD - 3 else ""
    if not field.isdigit():
        raise ValueError(f"{stat_path} has no start time in field {START_TIME_FIELD}: {text[:200]!r}")
    started_ticks = int(field)
    return time.clock_gettime(boottime) - started_ticks / os.sysconf("SC_CLK_TCK")
