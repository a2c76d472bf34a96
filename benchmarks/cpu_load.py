"""How busy the machine is, for benchmarks that share it: CPU seconds spent so far by the whole machine
and by this script's process tree (live processes plus what they reaped: a pool's forkserver, Ray's
raylet and workers, subprocesses). A run's `others` share = (machine - tree) / (wall x cores)."""

from __future__ import annotations

import os


def cpu_seconds() -> tuple[float, float] | None:
    """(machine, this process tree) CPU seconds so far; None without psutil or /proc."""
    try:
        import psutil

        with open("/proc/stat", encoding="ascii") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (ImportError, OSError, ValueError):
        return None
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    me = psutil.Process()
    mine = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        mine += t.user + t.system + t.children_user + t.children_system
    return busy, mine


def others_cpu_seconds() -> float | None:
    """CPU seconds the machine has spent outside this script's process tree so far (robust to other
    processes exiting meanwhile); None without psutil or /proc."""
    both = cpu_seconds()
    return None if both is None else both[0] - both[1]
