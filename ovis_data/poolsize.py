"""How many worker processes a phase of validate or pack gets: the number the user chose, else one per
core; but work too small to pay for a pool's start (forked workers, their imports; ~0.3-1 s) runs in the
calling process. Each caller says what "too small" is for its work."""

from __future__ import annotations

import os


def workers_for(processes: int | None, work: int, small: int) -> int:
    """`processes` where the user chose it; else all cores, or 1 (this process, no pool) for `work` under
    `small`."""
    if processes:
        return max(1, processes)
    return 1 if work < small else os.cpu_count() or 1
