"""The fetch entry points: URL datasets by name, or any URL list into any image directory; each run goes
where its options and its image_dir say: Ray tasks (`ray_engine`), an object store through a local staging
folder (`remote`), or a local folder (`engine`)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..errors import OvisDataError
from ..registry import DatasetSpec, load_registry
from ..storage import AnyPath
from .options import FetchOptions
from .progress import FetchReport
from .reader import UrlList, open_url_list
from .remote import fetch_here


def url_datasets(registry: dict[str, DatasetSpec]) -> list[DatasetSpec]:
    return [s for s in registry.values() if s.url_source is not None]


def fetch_datasets(
    names: list[str] | None,
    root: Path,
    options: FetchOptions | None = None,
    registry: dict[str, DatasetSpec] | None = None,
    console: Console | None = None,
) -> list[FetchReport]:
    """Fetch the named URL datasets (all of them when none named). Datasets sharing an image_dir and a
    URL list (the cc12m pair) are fetched once."""
    registry = registry if registry is not None else load_registry()
    specs = url_datasets(registry) if not names else [url_spec(registry, n) for n in names]
    groups: dict[tuple[str, str], list[DatasetSpec]] = {}
    for spec in specs:
        assert spec.url_source is not None and spec.image_dir is not None
        groups.setdefault((spec.image_dir, spec.url_source.url_list), []).append(spec)
    reports = []
    for group in groups.values():
        label = "+".join(s.name for s in group)
        reports.append(fetch_dataset(group[0].name, root, options, registry, console, label=label))
    return reports


def fetch_dataset(
    name: str,
    root: Path,
    options: FetchOptions | None = None,
    registry: dict[str, DatasetSpec] | None = None,
    console: Console | None = None,
    label: str | None = None,
) -> FetchReport:
    """Fetch one URL dataset's images into ROOT/images/<image_dir>, where its meta file expects them."""
    registry = registry if registry is not None else load_registry()
    spec = url_spec(registry, name)
    us = spec.url_source
    assert us is not None
    url_list = open_url_list(spec.url_list_path(root), us.url_column, us.image_path_column, us.sha256_column)
    image_dir = spec.image_path(root)
    assert image_dir is not None
    return fetch_url_list(url_list, image_dir, options, label=label or name, console=console)


def fetch_url_list(
    url_list: UrlList,
    image_dir: AnyPath,
    options: FetchOptions | None = None,
    label: str = "",
    console: Console | None = None,
) -> FetchReport:
    """Any parquet URL list into any image directory: as Ray tasks (`options.ray`), else on this machine
    (`remote.fetch_here`: an object-store URL is fetched here, each finished shard put there)."""
    if options is not None and options.ray is not None:
        from .ray_engine import fetch_with_ray  # Ray itself is imported only when asked for, in there

        return fetch_with_ray(url_list, image_dir, options, label, console)
    return fetch_here(url_list, image_dir, options or FetchOptions(), label, console)


def url_spec(registry: dict[str, DatasetSpec], name: str) -> DatasetSpec:
    if name not in registry:
        raise OvisDataError(f"unknown dataset {name!r}; known: {', '.join(registry)}")
    spec = registry[name]
    if spec.url_source is None:
        with_urls = ", ".join(s.name for s in url_datasets(registry))
        raise OvisDataError(f"{name} has no URL source to fetch (datasets with one: {with_urls})")
    return spec
