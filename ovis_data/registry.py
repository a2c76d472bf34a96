"""The dataset registry (dataset_info.json): what each dataset is and where its files live under a root."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .constants import DEFAULT_CAPTION_TEMPLATE, IMAGE_MARK
from .errors import OvisDataError
from .resources import resource_path
from .sources import Source, parse_source
from .storage import AnyPath, as_path, is_url

FORMATS = ("caption", "conversation")
ROOT_ENV = "OVIS_DATA_ROOT"


@dataclass(frozen=True)
class UrlSource:
    """Where a URL dataset's download list lives (a parquet under ROOT/meta_files) and its columns."""

    url_list: str
    url_column: str = "url"
    image_path_column: str = "image_path"
    sha256_column: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    meta_file: str
    image_dir: str | None
    data_format: str
    stage: int
    caption_template: str | None = None
    url_source: UrlSource | None = None
    source: Source | None = None  # where `ovis-data get` gets the meta file, URL list and images

    def meta_path(self, root: Path) -> Path:
        return root / "meta_files" / self.meta_file

    def image_path(self, root: Path) -> Path | None:
        return None if self.image_dir is None else root / "images" / self.image_dir

    def url_list_path(self, root: Path) -> Path | None:
        return None if self.url_source is None else root / "meta_files" / self.url_source.url_list


def _entry_error(source: Path, name: str, reason: str) -> OvisDataError:
    return OvisDataError(f"{source}: dataset entry {name!r}: {reason}")


def _parse_entry(source: Path, name: str, raw: object) -> DatasetSpec:
    if not isinstance(raw, dict):
        raise _entry_error(source, name, "must be an object")
    known = {"meta_file", "image_dir", "data_format", "stage", "caption_template", "url_source", "source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _entry_error(source, name, f"unknown keys {unknown}; known: {sorted(known)}")
    meta_file = raw.get("meta_file")
    if not isinstance(meta_file, str) or not meta_file:
        raise _entry_error(source, name, "meta_file must be a non-empty string")
    image_dir = raw.get("image_dir")
    if image_dir is not None and (not isinstance(image_dir, str) or not image_dir):
        raise _entry_error(source, name, "image_dir must be a non-empty string or null (text only)")
    fmt = raw.get("data_format")
    if fmt not in FORMATS:
        raise _entry_error(source, name, f"data_format must be one of {list(FORMATS)}, got {fmt!r}")
    stage = raw.get("stage")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (1, 2, 3):
        raise _entry_error(source, name, f"stage must be 1, 2 or 3, got {stage!r}")
    template = raw.get("caption_template")
    if fmt == "caption":
        template = DEFAULT_CAPTION_TEMPLATE if template is None else template
        if not isinstance(template, str) or template.count(IMAGE_MARK) != 1:
            raise _entry_error(source, name, f"caption_template must contain exactly one '{IMAGE_MARK}'")
    elif template is not None:
        raise _entry_error(source, name, "caption_template only applies to caption datasets")
    url_source = None
    if raw.get("url_source") is not None:
        us = raw["url_source"]
        if not isinstance(us, dict) or not isinstance(us.get("url_list"), str):
            raise _entry_error(source, name, "url_source must be an object with a 'url_list' string")
        extra = sorted(set(us) - {"url_list", "url_column", "image_path_column", "sha256_column"})
        if extra:
            raise _entry_error(source, name, f"url_source has unknown keys {extra}")
        url_source = UrlSource(**us)
        if image_dir is None:
            raise _entry_error(source, name, "a URL dataset needs an image_dir to download into")
    source_spec = None
    if raw.get("source") is not None:
        source_spec = parse_source(source, name, raw["source"], image_dir is not None, url_source is not None)
    return DatasetSpec(name, meta_file, image_dir, fmt, stage, template, url_source, source_spec)


def load_registry(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    """Read a dataset_info.json (the shipped one by default). Errors name the file and the entry."""
    source = Path(path) if path is not None else resource_path("dataset_info.json")
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise OvisDataError(f"{source}: dataset info file not found") from e
    except json.JSONDecodeError as e:
        raise OvisDataError(f"{source}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(raw, dict):
        raise OvisDataError(f"{source}: must be a JSON object mapping dataset names to entries")
    return {name: _parse_entry(source, name, entry) for name, entry in raw.items()}


def recipe_registry(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    """What a recipe's dataset names resolve against: the shipped datasets extended by a user's
    dataset_info.json (an entry of the same name replaces the shipped one), so a recipe can mix both."""
    registry = load_registry()
    if path is not None:
        registry.update(load_registry(path))
    return registry


def select(registry: dict[str, DatasetSpec], names: list[str] | None) -> list[DatasetSpec]:
    """The named datasets (all when none named); an unknown name is an error listing the known ones."""
    if not names:
        return list(registry.values())
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise OvisDataError(f"unknown dataset(s) {unknown}; known: {', '.join(registry)}")
    return [registry[n] for n in names]


def resolve_root(root: str | Path | None, must_exist: bool = True) -> AnyPath:
    """The data root: --root, else $OVIS_DATA_ROOT. Laid out as ROOT/meta_files and ROOT/images. An
    object-store URL (s3://bucket/prefix, any fsspec URL) gives a storage.RemotePath with the same layout."""
    value = root if root is not None else os.environ.get(ROOT_ENV)
    if not value:
        raise OvisDataError(f"no data root: pass --root or set {ROOT_ENV}")
    if is_url(value):
        remote = as_path(value)
        if must_exist and not remote.is_dir():
            raise OvisDataError(f"data root {remote} does not exist or holds nothing")
        return remote
    path = Path(value).expanduser().resolve()
    if must_exist and not path.is_dir():
        raise OvisDataError(f"data root {path} does not exist or is not a directory")
    return path
