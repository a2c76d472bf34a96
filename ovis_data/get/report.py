"""What `ovis-data get` tells the user: the plan (--dry-run), the summary table, the JSON report, and per
dataset how many samples still name a missing image (validate's meta-only check, catalogs kept aside)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from ..registry import DatasetSpec
from ..sources import human_size
from ..validate.dataset import validate_dataset
from .engine import UnitResult
from .plan import Plan

MISSING_REASONS = ("missing_image", "image_dir_missing")


@dataclass
class Gap:
    dataset: str
    samples: int
    missing: int  # samples naming an image that is not there
    error: str | None = None  # the meta file itself is absent or unreadable

    def to_json(self) -> dict:
        return {"samples": self.samples, "missing_images": self.missing, "error": self.error}


def missing_images(specs: list[DatasetSpec], root: Path) -> list[Gap]:
    """validate --meta-only per dataset; its catalogs go to a temporary folder (a full validate writes the
    real ones), so this leaves the root as it was."""
    gaps = []
    with tempfile.TemporaryDirectory(prefix="ovis-get-check-") as tmp:
        for spec in specs:
            r = validate_dataset(spec, root, "meta", catalog_out=Path(tmp))
            missing = sum(r.by_reason.get(k, 0) for k in MISSING_REASONS)
            error = r.error if r.error and not r.error.startswith("image_dir_missing") else None
            gaps.append(Gap(spec.name, r.total, missing, error))
    return gaps


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"get plan under {plan.root}")
    for col in ("dataset(s)", "what", "source", "size", "state"):
        table.add_column(col)
    for u in plan.units:
        state = "done" if u.done else (f"error: {u.error}" if u.error else "to get")
        if u.source.manual is not None and not u.done:
            there = (u.downloads(plan.root) / (u.source.path or "")).is_file()
            state = (
                "manual: file in place"
                if there
                else f"manual: put it at {u.downloads(plan.root) / str(u.source.path)}"
            )
        if u.source.note:
            state += f" ({u.source.note})"
        size = human_size(u.size) if u.size is not None else "?"
        table.add_row(", ".join(u.datasets), u.role, u.label(), size, state)
    need, unknown = plan.disk_needed()
    table.caption = f"disk needed: {human_size(need)}" + (f" + {unknown} of unknown size" if unknown else "")
    table.caption += " (downloads plus extracted)"
    return table


def summary_table(results: list[UnitResult], gaps: list[Gap]) -> Table:
    table = Table(title="ovis-data get")
    for col in ("dataset(s)", "source", "size", "status", "seconds"):
        table.add_column(col)
    for r in results:
        u = r.unit
        status = r.status + (f": {r.detail}" if r.detail and r.status != "failed" else "")
        if r.status == "failed":
            status = f"[red]failed[/]: {r.detail}"
        size = human_size(u.size) if u.size is not None else human_size(r.bytes) if r.bytes else "?"
        table.add_row(", ".join(u.datasets), u.label(), size, status, f"{r.seconds:.1f}")
    if gaps:
        shown = [g for g in gaps if g.missing or g.error]
        table.caption = "missing images: " + (
            "none"
            if not shown
            else "; ".join(
                f"{g.dataset} {g.error or f'{g.missing:,} of {g.samples:,} samples'}" for g in shown
            )
        )
    return table


def write_report(path: Path, root: Path, results: list[UnitResult], gaps: list[Gap], exit_code: int) -> None:
    payload = {
        "root": str(root),
        "exit_code": exit_code,
        "sources": [r.to_json() for r in results],
        "datasets": {g.dataset: g.to_json() for g in gaps},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def plan_json(plan: Plan) -> dict:
    need, unknown = plan.disk_needed()
    return {
        "root": str(plan.root),
        "disk_needed": need,
        "unknown_sizes": unknown,
        "units": [
            {"datasets": u.datasets, "role": u.role, "source": u.label(), "size": u.size, "done": u.done,
             "error": u.error}
            for u in plan.units
        ],
    }  # fmt: skip
