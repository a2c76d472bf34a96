"""One `ovis-data get` run end to end: plan, sources, the images of URL datasets (through fetch), and the
missing-image count per dataset; also what `ovis-data fetch` calls when a URL list is not there yet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from ..errors import OvisDataError
from ..registry import DatasetSpec
from .engine import GetOptions, Progress, UnitResult, get_datasets
from .plan import Plan
from .report import Gap, missing_images


@dataclass
class GetOutcome:
    plan: Plan
    results: list[UnitResult]
    gaps: list[Gap]
    fetched: list = field(default_factory=list)  # fetch's reports, for URL datasets

    @property
    def exit_code(self) -> int:
        """0 when every source is in place, 1 when one failed or waits for a manual step."""
        bad = [r for r in self.results if r.status not in ("done", "already done")]
        return 1 if bad else 0


def get(
    specs: list[DatasetSpec],
    root: Path,
    opts: GetOptions,
    progress: Progress | None = None,
    fetch_options: object | None = None,
    registry: dict[str, DatasetSpec] | None = None,
    console: Console | None = None,
) -> GetOutcome:
    """Get the datasets' sources into root. With `fetch_options` (fetch.FetchOptions), URL datasets whose
    URL list is then in place also get their images through fetch."""
    root.mkdir(parents=True, exist_ok=True)
    plan, results = get_datasets(specs, root, opts, progress)
    fetched = []
    if fetch_options is not None and not opts.meta_only:
        from ..fetch import fetch_datasets

        urls = [s.name for s in specs if s.url_source is not None and s.url_list_path(root).is_file()]
        if urls:
            reg = registry if registry is not None else {s.name: s for s in specs}
            fetched = fetch_datasets(urls, root, fetch_options, reg, console)  # type: ignore[arg-type]
    gaps = missing_images([s for s in specs if s.meta_path(root).is_file() or s.source], root)
    return GetOutcome(plan, results, gaps, fetched)


def get_command(names: list[str], root: Path, meta_only: bool = True) -> str:
    return f"ovis-data get {' '.join(names)} --root {root}" + (" --meta-only" if meta_only else "")


def ensure_url_lists(specs: list[DatasetSpec], root: Path, opts: GetOptions | None = None) -> list[str]:
    """Before fetch: each URL dataset's URL list in place, got from its `source.url_list` (or, when the
    URL list is its meta file, `source.meta_file`). Returns what was got; raises with the exact command
    to run when a list has no source."""
    got = []
    for spec in specs:
        path = spec.url_list_path(root)
        if path is None or path.is_file():
            continue
        src = spec.source
        has = src is not None and (
            src.url_list is not None or (src.meta_file is not None and path == spec.meta_path(root))
        )
        if not has:
            raise OvisDataError(
                f"{path}: URL list not found ({spec.name}), and its registry entry has no source.url_list to "
                f"get it from: put the file there (see docs/get.md)"
            )
        outcome_plan, results = get_datasets([spec], root, opts or GetOptions(meta_only=True))
        failed = [r for r in results if r.status not in ("done", "already done")]
        if failed or not path.is_file():
            detail = failed[0].detail if failed else "not got"
            raise OvisDataError(
                f"{path}: URL list not found, and getting it from its source failed ({detail}); retry with: "
                f"{get_command([spec.name], root)}"
            )
        got.append(spec.name)
    return got
