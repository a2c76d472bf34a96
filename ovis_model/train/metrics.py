"""What a run shows and keeps: a progress line, metrics as JSON lines and TensorBoard event files.

Only rank 0 writes. The progress line (step, loss, lr, grad norm, tokens/s, samples/s, ETA, peak memory) is
a rich live line on a terminal and plain lines every `log_every` steps elsewhere (CI logs stay readable).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console


class Metrics:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, log_every: int = 1) -> None:
        self.enabled, self.total, self.log_every = enabled, total_steps, max(1, log_every)
        self.console = Console(stderr=True, soft_wrap=True)
        self.live = enabled and self.console.is_terminal
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.totals = {"tokens": 0, "samples": 0, "supervised": 0}
        self._jsonl = self._tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=10)

    def step(self, step: int, values: dict[str, Any]) -> None:
        """Record one optimizer step's values (`loss`, `lr`, `grad_norm`, `tokens`, `samples`, ...)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.start = step - 1, now - values.get("step_time", 0.0)
        for key in self.totals:
            self.totals[key] += int(values.get(key, 0))
        elapsed = max(now - self.start, 1e-9)
        done = step - self.first_step
        rates = {
            "tokens_per_s": self.totals["tokens"] / elapsed,
            "samples_per_s": self.totals["samples"] / elapsed,
        }
        eta = elapsed / max(done, 1) * (self.total - step)
        record = {"step": step, **values, **rates, "eta_s": eta, "time": time.time()}
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, int | float):
                self._tb.add_scalar(f"train/{key}", value, step)
        if step % self.log_every == 0 or step == self.total:
            line = (
                f"step {step}/{self.total}  loss {values['loss']:.4f}  lr {values['lr']:.2e}  "
                f"grad norm {values.get('grad_norm', float('nan')):.3f}  "
                f"{rates['tokens_per_s']:,.0f} tok/s  {rates['samples_per_s']:,.1f} samples/s  "
                f"ETA {_duration(eta)}"
            )
            if "peak_memory_mib" in values:
                line += f"  peak {values['peak_memory_mib'] / 1024:.2f} GiB"
            if self.live:
                self.console.print(line, end="\r" if step < self.total else "\n", highlight=False)
            else:
                print(line, file=sys.stderr, flush=True)

    def val(self, step: int, values: dict[str, Any]) -> None:
        """A validation result (`val_loss`, ...): a JSON line (`"event": "val"`), TensorBoard `val/...`."""
        if not self.enabled:
            return
        record = {"event": "val", "step": step, **values, "time": time.time()}
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            if isinstance(value, int | float):
                self._tb.add_scalar(f"val/{key.removeprefix('val_')}", value, step)
        line = f"step {step}/{self.total}  val_loss {values['val_loss']:.4f}"
        if self.live:
            self.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def event(self, name: str, values: dict[str, Any]) -> None:
        """A non-step record (start, checkpoint, epoch summary, end) in the JSON lines."""
        if self.enabled:
            self._jsonl.write(
                json.dumps({"event": name, **values, "time": time.time()}, sort_keys=True) + "\n"
            )
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def drop_superseded(run_dir: Path, step: int, name: str = "metrics.jsonl") -> int:
    """Before a run resumed at `step` appends: remove the records of the steps after it (the killed run's
    steps past its last checkpoint, which the resumed run does again), so that each step has one record.
    Written beside and renamed. Returns how many records were dropped."""
    path = run_dir / name
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write
            dropped += 1
            continue
        if isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped
