"""How much of the machine other processes used during a timed run, so a benchmark can say
whether its figures were taken on a quiet machine (Linux /proc/stat; None elsewhere)."""

import os


def cpu_snapshot():
    """(all CPUs' jiffies, idle jiffies, this process's and its reaped children's CPU seconds); Linux."""
    try:
        with open("/proc/stat") as handle:
            ticks = [int(v) for v in handle.readline().split()[1:9]]
    except OSError:
        return None
    times = os.times()
    return (
        sum(ticks),
        ticks[3] + ticks[4],
        times.user + times.system + times.children_user + times.children_system,
    )


def other_load(start, end):
    """Share of all CPUs that other processes used between two snapshots (None where unknown)."""
    if not start or not end or end[0] == start[0]:
        return None
    busy = (end[0] - start[0]) - (end[1] - start[1])
    own = (end[2] - start[2]) * os.sysconf("SC_CLK_TCK")
    return max(0.0, busy - own) / (end[0] - start[0])
