"""`[train] log_samples = true`: RUN/stageN/samples.jsonl, the keys of the samples each rank consumed at each
optimizer step, so anyone can check what a run has seen (no sample twice in an epoch, none missing but the
plan's drops), also across resumes on another world size.

One line per optimizer step, rank and epoch (a step whose micro-batches cross into the next epoch gives two):
`{"epoch": E, "step": S, "rank": R, "samples": ["shard/record#k", ...]}`. Every rank appends to the one file;
each line is one write under an exclusive lock (flock), so lines never interleave.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .metrics import drop_superseded

NAME = "samples.jsonl"


class SampleLog:
    def __init__(self, run_dir: Path, rank: int, enabled: bool) -> None:
        self.path, self.rank, self.enabled = run_dir / NAME, rank, enabled

    def write(self, step: int, batches: list[dict]) -> None:
        if not self.enabled:
            return
        by_epoch: dict[int, list[str]] = {}
        for mb in batches:
            by_epoch.setdefault(int(mb["meta"]["epoch"]), []).extend(mb["meta"]["sample_keys"])
        text = "".join(
            json.dumps({"epoch": e, "step": step, "rank": self.rank, "samples": keys}) + "\n"
            for e, keys in by_epoch.items()
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, text.encode())
        finally:
            os.close(fd)  # releases the lock

    def resumed_at(self, step: int) -> None:
        """Rank 0, before any rank writes: drop the killed run's lines past the checkpoint's step."""
        if self.enabled:
            drop_superseded(self.path.parent, step, NAME)
