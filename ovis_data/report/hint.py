"""The line `validate` and `pack` end with: the report command for what they just did."""

from __future__ import annotations

import shlex
from pathlib import Path


def report_hint(
    root: str | Path | None,
    *,
    stage: int | None = None,
    names: list[str] | None = None,
    recipe: str | Path | None = None,
    packed: str | Path | None = None,
    dataset_info: str | Path | None = None,
    catalog_dir: str | Path | None = None,
) -> str:
    """`ovis-data report ... --out report.html` for these datasets (and packed stage), ready to paste."""
    args = ["ovis-data", "report"]
    if recipe is not None:
        args += ["--recipe", str(recipe)]
    elif stage is not None:
        args += ["--stage", str(stage)]
    else:
        args += list(names or [])
    if dataset_info is not None:
        args += ["--dataset-info", str(dataset_info)]
    if root is not None:  # else $OVIS_DATA_ROOT, as for the command that printed this
        args += ["--root", str(root)]
    if catalog_dir is not None:
        args += ["--catalog-dir", str(catalog_dir)]
    if packed is not None:
        args += ["--packed", str(packed)]
    args += ["--out", "report.html"]
    return "Look at the data in a browser: " + shlex.join(args)
