"""What `ovis-data get` will do: the selected datasets' sources as units of work, each with its target,
size (recorded, or asked of the server when not) and state (done, or still to do).

A unit is one meta file, one URL list, or one archive (a split archive's parts together; each file a
`pattern` matches is its own unit). Datasets sharing a source (the ALLaVA captions and instructions share
their images) share the unit: it is got once.
"""

from __future__ import annotations

import hashlib
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..registry import DatasetSpec
from ..sources import SourceFile
from .download import Hub, SourceFailed, hub_list, hub_sizes, url_size
from .place import file_marker, image_marker, read_marker

ROLES = ("meta_file", "url_list", "images")


@dataclass
class Unit:
    key: str  # its done-marker's name
    role: str  # meta_file, url_list, images
    dataset: str  # the first dataset that names it: its downloads go to ROOT/downloads/<dataset>/
    source: SourceFile
    files: tuple[str, ...]  # repo paths (hub), URLs (url) or the file name (manual)
    sizes: tuple[int | None, ...]
    sha256s: tuple[str | None, ...]
    target: Path  # the meta file / URL list itself, or image_dir
    datasets: list[str] = field(default_factory=list)
    group: str | None = None  # a pattern's marker key: written when all its units are done
    done: bool = False
    error: str | None = None  # a failure already at planning (a listing refused)

    @property
    def size(self) -> int | None:
        return None if None in self.sizes else sum(s for s in self.sizes if s is not None)

    @property
    def archive(self) -> bool:
        return self.role == "images" and self.source.file_format(posixpath.basename(self.files[0])) != "file"

    def label(self) -> str:
        sf = self.source
        if sf.manual is not None:
            return f"manual {sf.path}"
        first = self.files[0] + (f" (+{len(self.files) - 1} parts)" if len(self.files) > 1 else "")
        return f"{sf.hub}:{first}" if sf.hub is not None else first

    def downloads(self, root: Path) -> Path:
        return root / "downloads" / self.dataset


@dataclass
class Plan:
    root: Path
    units: list[Unit]
    specs: list[DatasetSpec]
    groups: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # pattern key -> (marker, payload)

    def todo(self) -> list[Unit]:
        return [u for u in self.units if not u.done and u.error is None]

    def disk_needed(self) -> tuple[int, int]:
        """(bytes the units still to do need: downloads plus what archives expand to, estimated as their
        own size since images hardly compress; number of those units whose size is unknown)."""
        need, unknown = 0, 0
        for u in self.todo():
            if u.size is None:
                unknown += 1
            else:
                need += u.size * (2 if u.archive else 1)
        return need, unknown


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _tuple(value: object, n: int) -> tuple:
    return tuple(value) if isinstance(value, tuple) else (value,) * n if n == 1 else (None,) * n


def _file_unit(role: str, spec: DatasetSpec, sf: SourceFile, target: Path) -> Unit:
    what = sf.path if sf.hub is not None else sf.url
    assert what is not None
    key = _key(role, str(target.name), sf.identity())
    unit = Unit(key, role, spec.name, sf, (what,), (_planned(sf),), (sf.sha256,), target)  # type: ignore[arg-type]
    marker = read_marker(file_marker(target))
    unit.done = bool(
        marker
        and marker.get("key") == key
        and target.is_file()
        and target.stat().st_size == marker.get("size")
    )
    return unit


def _planned(sf: SourceFile) -> object:
    """The size a plan counts on: the exact one, else the approximate one (a rounded listing)."""
    return sf.size if sf.size is not None else sf.approx_size


def _image_units(spec: DatasetSpec, sf: SourceFile, root: Path, hub: Hub) -> list[Unit]:
    image_dir = spec.image_path(root)
    assert image_dir is not None
    base = _key("images", spec.image_dir or "", sf.identity())
    n = len(sf.parts) or 1
    listed = sf.pattern or sf.parts_pattern
    if sf.manual is not None:
        files: tuple[str, ...] = (sf.path or "",)
    elif sf.parts:
        files = sf.parts
    elif listed is None:
        files = (sf.path if sf.hub is not None else sf.url,)  # type: ignore[assignment]
    else:
        marker = read_marker(image_marker(image_dir, base))

        def whole(**kw: object) -> Unit:
            return Unit(base, "images", spec.name, sf, (listed,), (None,), (None,), image_dir, **kw)  # type: ignore[arg-type]

        if marker is not None and marker.get("key") == base:  # every file it matches is in place
            return [whole(done=True)]
        try:
            matched = hub_list(hub, sf.hub or "", sf.revision, listed)
        except SourceFailed as e:
            return [whole(error=str(e))]
        if not matched:
            return [whole(error=f"{sf.hub}: no file matches {listed!r}")]
        if sf.parts_pattern is not None:  # one split archive: the matches, in name order, are its parts
            names = tuple(p for p, _ in matched)
            sizes = tuple(s for _, s in matched)
            return [Unit(base, "images", spec.name, sf, names, sizes, (None,) * len(names), image_dir)]
        units = []
        for path, size in matched:
            key = _key(base, path)
            unit = Unit(key, "images", spec.name, sf, (path,), (size,), (None,), image_dir, group=base)
            unit.done = (read_marker(image_marker(image_dir, key)) or {}).get("key") == key
            units.append(unit)
        return units
    unit = Unit(
        base, "images", spec.name, sf, files, _tuple(_planned(sf), n), _tuple(sf.sha256, n), image_dir
    )
    unit.done = (read_marker(image_marker(image_dir, base)) or {}).get("key") == base
    return [unit]


def _probe_sizes(units: list[Unit], hub: Hub) -> None:
    """Ask the servers, all at once, for the sizes that are not recorded (HEAD for URLs, paths-info for
    the Hub); an unreachable server leaves the size unknown."""
    by_repo: dict[tuple[str, str], list[Unit]] = {}
    urls: list[Unit] = []
    for u in units:
        if u.done or u.error or u.size is not None or u.source.manual is not None:
            continue
        if u.source.hub is not None:
            by_repo.setdefault((u.source.hub, u.source.revision), []).append(u)
        else:
            urls.append(u)

    def one_url(u: Unit) -> None:
        u.sizes = tuple(s if s is not None else url_size(f) for s, f in zip(u.sizes, u.files, strict=True))

    def one_repo(item: tuple[tuple[str, str], list[Unit]]) -> None:
        (repo, rev), group = item
        try:
            sizes = hub_sizes(hub, repo, rev, sorted({f for u in group for f in u.files}))
        except SourceFailed:
            return  # the run itself reports what is wrong with the repo
        for u in group:
            u.sizes = tuple(
                s if s is not None else sizes.get(f) for s, f in zip(u.sizes, u.files, strict=True)
            )

    with ThreadPoolExecutor(16, thread_name_prefix="ovis-get-probe") as pool:
        list(pool.map(one_url, urls))
        list(pool.map(one_repo, by_repo.items()))


def make_plan(specs: list[DatasetSpec], root: Path, hub: Hub, meta_only: bool, probe: bool) -> Plan:
    """The units of the given datasets, deduplicated. `probe`: ask servers for unrecorded sizes (a pattern
    is always listed, being unknown otherwise)."""
    units: dict[str, Unit] = {}
    by_target: dict[Path, Unit] = {}
    plan = Plan(root, [], specs)

    def add(unit: Unit, spec: DatasetSpec) -> None:
        if unit.role != "images" and unit.target in by_target:  # coyo's meta file is its URL list
            unit = by_target[unit.target]
        unit = units.setdefault(unit.key, unit)
        by_target.setdefault(unit.target, unit) if unit.role != "images" else None
        if spec.name not in unit.datasets:
            unit.datasets.append(spec.name)

    for spec in specs:
        src = spec.source
        if src is None:
            continue
        if src.meta_file is not None:
            add(_file_unit("meta_file", spec, src.meta_file, spec.meta_path(root)), spec)
        if src.url_list is not None and spec.url_source is not None:
            target = spec.url_list_path(root)
            assert target is not None
            add(_file_unit("url_list", spec, src.url_list, target), spec)
        if meta_only:
            continue
        for sf in src.images:
            for unit in _image_units(spec, sf, root, hub):
                add(unit, spec)
                if unit.group is not None:
                    marker = image_marker(unit.target, unit.group)
                    plan.groups[unit.group] = (marker, {"key": unit.group, "source": sf.describe()})
    plan.units = list(units.values())
    if probe:
        _probe_sizes(plan.units, hub)
    return plan
