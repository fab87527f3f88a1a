"""Which process a pid names: pids are reused, so tether pins a process by its start as well.

The start is read as clock ticks since boot (``/proc/PID/stat``, field 22), which never change
for a process. psutil's ``create_time()`` adds ``/proc/stat``'s ``btime`` to them, and btime
moves whenever NTP slews or steps the wall clock: two readings of one process minutes apart can
differ by a second, and a live server would then look like a reused pid (its state file removed,
its kernels refused). Starts since boot are only comparable within one boot: what is kept on
disk records :func:`boot_id` beside them.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

# two starts of one process read alike exactly; a reused pid differs by at least a clock tick
SAME_START = 0.005


def started(proc: psutil.Process) -> float:
    """When ``proc`` started, in seconds since boot (elsewhere than Linux: psutil's create
    time); raises ``psutil.NoSuchProcess`` if it is gone."""
    if sys.platform != "linux":
        return float(proc.create_time())
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name may hold spaces and ')'
    except (FileNotFoundError, ProcessLookupError) as e:
        import psutil

        raise psutil.NoSuchProcess(proc.pid) from e
    return int(fields[19]) / _CLK_TCK


def same_start(a: float, b: float) -> bool:
    return abs(a - b) < SAME_START


def age(start: float) -> float:
    """Seconds since ``start``, a value of :func:`started` (the kernel's uptime on the page)."""
    if sys.platform != "linux":
        return time.time() - start
    # /proc/PID/stat counts from boot on CLOCK_BOOTTIME (suspend included)
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start


def boot_id() -> str:
    """This boot's id ("" where the system has none)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
