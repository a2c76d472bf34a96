"""The validation report: per-dataset counts and every bad sample, streamed from the rejected files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
from rich.table import Table

from .catalog import rejected_path
from .dataset import DatasetResult

REPORT_KEYS = ("dataset", "row", "id", "reason", "detail")  # of each bad sample (the rejected file has more)


def write_report(path: Path, results: list[DatasetResult], root: Path, catalog_out: Path | None) -> None:
    """{"datasets": {NAME: counts}, "bad_samples": [{dataset,row,id,reason,detail}, ...]}, atomically.

    Bad samples are streamed batch by batch: a dataset with a million bad rows never sits in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:  # never a stray .tmp: a failed write (disk full, path taken meanwhile) removes it
        with open(tmp, "w", encoding="utf-8") as f:
            datasets = {r.name: r.to_json() for r in results}
            f.write('{"datasets": ' + json.dumps(datasets, indent=2) + ',\n"bad_samples": [')
            first = True
            for r in results:
                rej = rejected_path(root, r.name, catalog_out)
                if not r.catalog_written or not rej.exists():  # an earlier run's rejects are not this run's
                    continue
                for batch in pq.ParquetFile(rej).iter_batches(batch_size=65536, columns=list(REPORT_KEYS)):
                    for row in batch.to_pylist():
                        f.write(("\n" if first else ",\n") + json.dumps(row, ensure_ascii=False))
                        first = False
            f.write("\n]}\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def summary_table(results: list[DatasetResult]) -> Table:
    table = Table(title="Validation")
    for col, justify in (("dataset", "left"), ("total", "right"), ("good", "right"), ("bad", "right")):
        table.add_column(col, justify=justify, no_wrap=col == "dataset")  # names whole, even at 80 columns
    table.add_column("bad by reason")
    for r in results:
        reasons = ", ".join(f"{k}: {v}" for k, v in r.by_reason.items())
        if r.error:
            reasons = f"[red]{r.error}[/]" + (f"; {reasons}" if reasons else "")
        style = "green" if r.bad == 0 and not r.error else "yellow"
        table.add_row(r.name, str(r.total), f"[{style}]{r.good}[/]", str(r.bad), reasons)
    return table
