"""Seeing a fetch work: live counters and progress bar, a high-failure warning, the final report."""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import classes as C

WARN_WINDOW = 1000  # rows in the sliding window that the failure-rate warning looks at
WARN_MIN_ROWS = 200


@dataclass
class FetchReport:
    dataset: str
    total: int  # rows of the URL list in this part
    success: int  # over every finished shard, earlier runs included
    failed: dict[str, int]  # failure class -> rows
    elapsed_s: float
    images_per_s: float  # images stored per second by this run
    image_dir: str = ""
    layout: str = ""
    engine: str = "ovis-data"
    shards: dict[str, int] = field(default_factory=dict)  # total / done_before / done_now / unfinished
    this_run: dict[str, int] = field(default_factory=dict)  # attempted / success / failed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        tmp.replace(path)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        ok = task.fields.get("ok", 0)
        elapsed = task.elapsed or 0.0
        rate = ok / elapsed if elapsed > 0 else 0.0
        done = task.completed or 0
        success = 100.0 * ok / done if done else 100.0
        return Text(f"{rate:7.1f} img/s  {success:5.1f}% ok", style="cyan")


class Monitor:
    """Counts outcomes as rows finish; drives a rich progress bar when a console is given."""

    def __init__(self, label: str, total: int, console: Console | None) -> None:
        self.console = console
        self.counts: Counter[str] = Counter()
        self.done = 0
        self.recent: deque[str] = deque(maxlen=WARN_WINDOW)
        self.start = time.monotonic()
        self._warned_at = -WARN_WINDOW
        self.warn_rate = 0.5
        self._progress: Progress | None = None
        if console is not None and console.is_terminal:  # a bar in a log file is noise; warnings still go
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                _RateColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(label, total=total, ok=0)

    def __enter__(self) -> Monitor:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def row(self, status: str) -> None:
        self.done += 1
        self.counts[status] += 1
        self.recent.append(status)
        if self._progress is not None:
            self._progress.update(self._task, advance=1, ok=self.counts[C.SUCCESS])
        # Look every 100 rows; after a warning, stay quiet for a whole window.
        if self.done % 100 == 0 and self.done - self._warned_at >= WARN_WINDOW and self.done >= WARN_MIN_ROWS:
            self._check_failure_rate()

    def _check_failure_rate(self) -> None:
        failures = Counter(s for s in self.recent if s != C.SUCCESS)
        rate = sum(failures.values()) / len(self.recent)
        if rate < self.warn_rate:
            return
        self._warned_at = self.done
        top = ", ".join(f"{cls} {n}" for cls, n in failures.most_common(3))
        hint = (
            " (DNS: is the resolver overloaded or offline?)"
            if failures.most_common(1)[0][0] == C.DNS_ERROR
            else ""
        )
        self.warn(f"{rate:.0%} of the last {len(self.recent)} rows failed; top: {top}{hint}")

    def warn(self, message: str) -> None:
        if self.console is not None:
            self.console.print(f"[bold yellow]warning:[/] {message}", highlight=False)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def summary_table(report: FetchReport) -> Table:
    table = Table(title=f"fetch {report.dataset} ({report.layout})", title_justify="left")
    table.add_column("outcome")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    done = report.success + sum(report.failed.values())
    table.add_row("[green]success[/]", str(report.success), f"{100 * report.success / max(done, 1):.1f}%")
    for cls, n in sorted(report.failed.items(), key=lambda kv: -kv[1]):
        table.add_row(f"[red]{cls}[/]", str(n), f"{100 * n / max(done, 1):.1f}%")
    if done < report.total:
        table.add_row("[yellow]not yet fetched[/]", str(report.total - done), "")
    run = report.this_run
    speed = f"{report.elapsed_s:.1f}s, {report.images_per_s:.1f} img/s"
    table.caption = f"this run: {run.get('attempted', 0)} rows in {speed}" if run else speed
    return table
