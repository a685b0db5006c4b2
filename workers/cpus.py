"""The cores this process may run on: its affinity mask, not the machine's core count.

A process started under ``taskset`` (or ``scripts/bench.py --pin``) and everything it
starts inherit the mask; thread and slot counts sized from ``os.cpu_count()`` would then
oversubscribe the cores it has. ``cluster/`` and ``benchmarks/`` use this helper too
(``workers/`` imports nothing from them).
"""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """How many cores this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
