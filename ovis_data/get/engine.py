"""`ovis-data get`: run a plan. Units run `jobs` at a time (downloads overlap extractions); each unit
  downloads its file(s) into ROOT/downloads/<dataset>/, verifies size and sha256 when recorded, then
  a meta file / URL list: renamed into ROOT/meta_files/
  an archive: extracted into staging, merged into image_dir (place.py), its archive deleted (unless kept)
and only then writes its done-marker. A unit that fails is reported in one line; the others go on.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OvisDataError
from ..registry import DatasetSpec
from ..sources import human_size
from .download import Hub, SourceFailed, forget_hub_file, free_bytes, hub_download, url_download, verify
from .extract import MAX_RATIO, extract
from .place import clear, file_marker, image_marker, merge, staging_dir, write_marker
from .plan import Plan, Unit, make_plan

Progress = Callable[[str, int, int], None]  # (label, done, total), as clikit.ProgressDisplay takes


class NotEnoughSpace(OvisDataError):
    """The plan needs more disk than is free: nothing was downloaded."""


@dataclass(frozen=True)
class GetOptions:
    meta_only: bool = False
    keep_archives: bool = False
    jobs: int = 4
    hub: Hub = field(default_factory=Hub)
    max_ratio: float = MAX_RATIO
    check_space: bool = True


@dataclass
class UnitResult:
    unit: Unit
    status: str  # done, already done, failed, manual
    detail: str = ""
    bytes: int = 0
    files: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        u = self.unit
        return {
            "datasets": u.datasets, "role": u.role, "source": u.label(), "status": self.status,
            "detail": self.detail, "size": u.size, "bytes_downloaded": self.bytes, "files": self.files,
            "seconds": round(self.seconds, 3),
        }  # fmt: skip


class _Bytes:
    """Bytes received across all units, reported as one progress line."""

    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress = 0, total, progress
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.progress is not None:
                self.progress("downloading", self.done, max(self.total, self.done))

    def unit(self) -> _UnitBytes:
        return _UnitBytes(self)


class _UnitBytes:
    """One unit's bytes (what its report says it downloaded), also counted in the total."""

    def __init__(self, total: _Bytes):
        self.total, self.done = total, 0

    def add(self, n: int) -> None:
        self.done += n
        self.total.add(n)


def manual_step(unit: Unit, root: Path) -> str:
    sf = unit.source
    where = unit.downloads(root) / (sf.path or "")
    link = f" ({sf.url})" if sf.url else ""
    return f"{unit.dataset}: manual step: {sf.manual}{link} Put the file at {where}, then run get again."


def _fetch_files(unit: Unit, root: Path, opts: GetOptions, counter: _UnitBytes) -> list[Path]:
    """The unit's file(s) on disk, verified."""
    sf, into = unit.source, unit.downloads(root)
    paths = []
    for i, name in enumerate(unit.files):
        size, sha = unit.sizes[i] if sf.size is not None else None, unit.sha256s[i]
        what = f"{unit.label()}" if len(unit.files) == 1 else f"{unit.label()} part {name}"
        if sf.manual is not None:
            path = into / name
            if not path.is_file():
                raise _Manual(manual_step(unit, root))
        elif sf.hub is not None:
            path = hub_download(opts.hub, sf.hub, name, sf.revision, into, counter.add)
        else:
            path = url_download(name, _download_path(unit, root, name), counter.add, size)
        try:
            verify(path, size, sha, what)
        except SourceFailed:
            if sf.hub is not None:
                forget_hub_file(into, name)
            raise
        paths.append(path)
    return paths


def _download_path(unit: Unit, root: Path, name: str) -> Path:
    if unit.source.url is not None and unit.source.manual is None:
        return unit.downloads(root) / posixpath.basename(name.split("?")[0])
    return unit.downloads(root) / name


class _Manual(Exception):
    pass


def _drop(unit: Unit, root: Path, paths: list[Path]) -> None:
    into = unit.downloads(root)
    for name, path in zip(unit.files, paths, strict=True):
        if unit.source.hub is not None:
            forget_hub_file(into, name)
        else:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".part").unlink(missing_ok=True)


def _prune(folder: Path) -> None:
    """Empty folders under ROOT/downloads/ (after the run: a unit still running may be writing there)."""
    if not folder.is_dir():
        return
    for cache in folder.glob("*/.cache/huggingface"):  # huggingface_hub's local-dir records
        if not any(p.is_file() and p.suffix != ".lock" for p in (cache / "download").rglob("*")):
            shutil.rmtree(cache.parent)  # nothing half-downloaded or kept is recorded there any more
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _place(
    unit: Unit, paths: list[Path], root: Path, opts: GetOptions, progress: Progress | None
) -> UnitResult:
    """Verified file(s) to their place: a meta file renamed, an archive extracted and merged; then the
    done-marker, then the archive deleted."""
    payload = {"key": unit.key, "source": unit.label(), "size": sum(p.stat().st_size for p in paths)}
    if unit.role != "images":
        unit.target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(paths[0], unit.target)
        _drop(unit, root, [paths[0]])  # renamed away already: this clears huggingface_hub's record
        write_marker(file_marker(unit.target), payload)
        return UnitResult(unit, "done", "", 0, 1)
    staging = staging_dir(unit.target, unit.key)
    clear(staging)  # what a killed run left half-extracted
    staging.mkdir(parents=True)
    on_file = (lambda n: progress(f"extracting {unit.label()}", n, 0)) if progress else None
    try:
        got = extract(paths, unit.source, staging, unit.label(), on_file, opts.max_ratio)
        merge(staging, unit.target)
    finally:
        clear(staging)
        with contextlib.suppress(OSError):  # image_dir/.get/staging, unless another unit stages there
            staging.parent.rmdir()
    payload["files"] = got.files
    write_marker(image_marker(unit.target, unit.key), payload)
    if not opts.keep_archives:
        _drop(unit, root, paths)
    detail = f"{got.files:,} files" + (f", {got.skipped:,} members left out" if got.skipped else "")
    return UnitResult(unit, "done", detail, 0, got.files)


def _guarded(unit: Unit, counter: _UnitBytes, started: float, work: Callable[[], object]) -> object:
    """work(), with a failure turned into this unit's result: the other units go on."""
    try:
        return work()
    except _Manual as e:
        return UnitResult(unit, "manual", str(e), 0, 0, time.monotonic() - started)
    except SourceFailed as e:
        return UnitResult(unit, "failed", str(e), counter.done, 0, time.monotonic() - started)
    except OSError as e:  # a full disk, a permission: this source fails, the others go on
        detail = f"{unit.label()}: {e.strerror or e}: {e.filename or ''}".rstrip(": ")
        return UnitResult(unit, "failed", detail, counter.done, 0, time.monotonic() - started)


def _run_units(todo: list[Unit], root: Path, opts: GetOptions, total: _Bytes, progress: Progress | None):
    """Downloads `jobs` at a time; each verified download is handed to an extraction pool, so the next
    downloads run while earlier archives are extracted."""
    cores = os.cpu_count() or 1
    with (
        ThreadPoolExecutor(max(1, min(opts.jobs, cores)), thread_name_prefix="ovis-get-x") as extractors,
        ThreadPoolExecutor(max(1, opts.jobs), thread_name_prefix="ovis-get-dl") as downloaders,
    ):

        def start(unit: Unit) -> object:
            started, counter = time.monotonic(), total.unit()
            paths = _guarded(unit, counter, started, lambda: _fetch_files(unit, root, opts, counter))
            if isinstance(paths, UnitResult):
                return paths

            def finish() -> object:
                r = _guarded(unit, counter, started, lambda: _place(unit, paths, root, opts, progress))
                assert isinstance(r, UnitResult)
                r.bytes, r.seconds = counter.done, time.monotonic() - started
                return r

            return extractors.submit(finish)

        results = []
        for fut in [downloaders.submit(start, u) for u in todo]:
            r = fut.result()
            results.append(r if isinstance(r, UnitResult) else r.result())  # type: ignore[attr-defined]
        return results


def check_space(plan: Plan) -> None:
    need, unknown = plan.disk_needed()
    free = free_bytes(plan.root)
    if need > free:
        more = f" (plus {unknown} file(s) of unknown size)" if unknown else ""
        raise NotEnoughSpace(
            f"{plan.root}: the plan needs {human_size(need)}{more} (downloads plus extracted), "
            f"{human_size(free)} is free: nothing downloaded (see --dry-run)"
        )


def run_plan(plan: Plan, opts: GetOptions, progress: Progress | None = None) -> list[UnitResult]:
    if opts.check_space:
        check_space(plan)
    results = [UnitResult(u, "failed", u.error) for u in plan.units if u.error is not None]
    results += [UnitResult(u, "already done") for u in plan.units if u.done]
    if not opts.keep_archives:  # a run killed between a marker and the archive's deletion left it behind
        for u in plan.units:
            if u.done and u.role == "images" and u.source.pattern is None:
                _drop(u, plan.root, [_download_path(u, plan.root, name) for name in u.files])
    todo = plan.todo()
    counter = _Bytes(sum(u.size or 0 for u in todo if u.source.manual is None), progress)
    # meta files first: they are small, and the missing-image count needs them
    todo.sort(key=lambda u: (u.role == "images", -(u.size or 0)))
    results += _run_units(todo, plan.root, opts, counter, progress)
    _prune(plan.root / "downloads")
    for key, (marker, payload) in plan.groups.items():
        members = [r for r in results if r.unit.group == key]
        if members and all(r.status in ("done", "already done") for r in members):
            write_marker(marker, payload)
    order = {id(u): i for i, u in enumerate(plan.units)}
    return sorted(results, key=lambda r: order[id(r.unit)])


def get_datasets(
    specs: list[DatasetSpec], root: Path, opts: GetOptions, progress: Progress | None = None
) -> tuple[Plan, list[UnitResult]]:
    plan = make_plan(specs, root, opts.hub, opts.meta_only, probe=opts.check_space)
    return plan, run_plan(plan, opts, progress)
