"""The `source` key of a dataset_info.json entry: where a dataset's meta file, URL list and images come from.

Parsed here (the registry calls `parse_source`), executed by `ovis_data.get`. The format is described in
docs/get.md; every error names the file, the entry and the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .errors import OvisDataError

FORMATS = ("zip", "tar", "parquet", "file")
_FILE_KEYS = {"hub", "url", "path", "revision", "size", "approx_size", "sha256", "note"}
_IMAGE_KEYS = _FILE_KEYS | {
    "pattern", "parts", "parts_pattern", "manual", "format", "strip", "into", "include", "flatten",
    "image_column", "name_column", "name_template",
}  # fmt: skip


@dataclass(frozen=True)
class SourceFile:
    """One thing to download (or, for `manual`, to wait for) and how it becomes files."""

    hub: str | None = None  # OWNER/NAME of a Hub dataset repository
    url: str | None = None  # plain HTTP(S)
    path: str | None = None  # file in the repo (hub) or, for manual, the file name the user puts in place
    pattern: str | None = None  # hub: every repo file matching this glob, each its own archive
    parts: tuple[str, ...] = ()  # a split archive: repo paths (hub) or URLs, concatenated in this order
    parts_pattern: str | None = None  # hub: a split archive whose parts are the matching files, by name
    manual: str | None = None  # the instruction a person must follow
    revision: str = "main"
    size: int | tuple[int, ...] | None = None
    approx_size: int | tuple[int, ...] | None = None  # from a rounded listing: planning only, never verified
    sha256: str | tuple[str, ...] | None = None
    format: str | None = None
    strip: str = ""
    into: str = ""
    include: tuple[str, ...] = ()
    flatten: bool = False  # keep only each member's base name (after strip, before into), as `unzip -j`
    image_column: str = "image"
    name_column: str | None = None
    name_template: str | None = None
    note: str | None = None

    @property
    def kind(self) -> str:
        return "manual" if self.manual is not None else ("hub" if self.hub is not None else "url")

    def identity(self) -> str:
        """A short stable hash of everything that decides the resulting files (notes excluded): a done
        marker is only trusted while its source entry is unchanged."""
        raw = {k: v for k, v in self.__dict__.items() if k not in ("note", "approx_size")}
        text = json.dumps(raw, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def file_format(self, name: str) -> str:
        if self.format is not None:
            return self.format
        return format_from_name(name)

    def describe(self) -> str:
        if self.manual is not None:
            return f"manual: {self.path}"
        where = self.hub if self.hub is not None else ""
        what = (
            self.path
            or self.pattern
            or (f"{self.parts[0]} (+{len(self.parts) - 1} parts)" if self.parts else "")
            or f"{self.parts_pattern} (parts)"
        )
        if self.hub is None:
            what = self.url or what
            return what
        return f"{where}:{what}" + (f"@{self.revision}" if self.revision != "main" else "")


def format_from_name(name: str) -> str:
    lower = name.lower()
    for suffix in (".001", ".part1", "_aa"):  # a split archive's first part: its format is the stem's
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")):
        return "tar"
    if lower.endswith(".parquet"):
        return "parquet"
    return "file"


@dataclass(frozen=True)
class Source:
    meta_file: SourceFile | None = None
    url_list: SourceFile | None = None
    images: tuple[SourceFile, ...] = field(default_factory=tuple)
    note: str | None = None

    def recorded_size(self) -> tuple[int, int]:
        """(bytes recorded, number of files whose size is not recorded)."""
        total, unknown = 0, 0
        for f in (self.meta_file, self.url_list, *self.images):
            if f is None or f.manual is not None and f.size is None:
                continue
            known = f.size if f.size is not None else f.approx_size
            sizes = known if isinstance(known, tuple) else (known,)
            if f.pattern is not None or f.parts_pattern is not None and known is None or None in sizes:
                unknown += 1
            else:
                total += sum(s for s in sizes if s is not None)
        return total, unknown


class _Where:
    def __init__(self, file: object, entry: str, key: str):
        self.prefix = f"{file}: dataset entry {entry!r}: source.{key}"

    def error(self, reason: str) -> OvisDataError:
        return OvisDataError(f"{self.prefix}: {reason}")


def _str(where: _Where, raw: dict, key: str, default: str | None = None) -> str | None:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise where.error(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _safe_rel(where: _Where, key: str, value: str) -> str:
    """strip/into: a relative folder inside image_dir, given with or without its trailing slash."""
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value:
        raise where.error(f"'{key}' must be a relative folder without '..', got {value!r}")
    return value.rstrip("/") + "/"


def _sizes(where: _Where, raw: dict, n_parts: int, key: str = "size") -> tuple[object, object]:
    size, sha = raw.get(key), raw.get("sha256")

    def one_size(v: object) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise where.error(f"'{key}' must be a byte count (int >= 0), got {v!r}")
        return v

    def one_sha(v: object) -> str:
        if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower()):
            raise where.error(f"'sha256' must be 64 hex digits, got {v!r}")
        return v.lower()

    def per_part(value: object, name: str, one: Callable[[object], object]) -> object:
        """One value, or a list of one per part (split archives)."""
        if isinstance(value, list):
            if len(value) != n_parts:
                raise where.error(f"'{name}' lists {len(value)} values for {n_parts} parts")
            return tuple(one(v) for v in value)
        return None if value is None else one(value)

    return per_part(size, key, one_size), per_part(sha, "sha256", one_sha)


def _parse_file(where: _Where, raw: object, image: bool) -> SourceFile:
    if not isinstance(raw, dict):
        raise where.error("must be an object")
    allowed = _IMAGE_KEYS if image else _FILE_KEYS
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise where.error(f"unknown keys {unknown}; known: {sorted(allowed)}")
    hub, url, manual = _str(where, raw, "hub"), _str(where, raw, "url"), _str(where, raw, "manual")
    path, pattern = _str(where, raw, "path"), _str(where, raw, "pattern")
    parts, parts_pattern = raw.get("parts"), _str(where, raw, "parts_pattern")
    if manual is not None:
        if hub is not None or pattern is not None or parts is not None or parts_pattern is not None:
            raise where.error("a 'manual' source takes 'path' (the file name) and an optional 'url' only")
        if path is None or "/" in path or path in (".", ".."):
            raise where.error("a 'manual' source needs 'path': the plain file name the user puts in place")
    elif hub is None and url is None and isinstance(parts, list) and parts and isinstance(parts[0], str):
        url = parts[0]  # a split archive by URL: its parts are the URLs (checked below like 'url')
        if not all(isinstance(p, str) and p.startswith(("http://", "https://")) for p in parts):
            raise where.error("'parts' without 'hub' must be a list of http(s) URLs")
    elif (hub is None) == (url is None):
        raise where.error("needs exactly one of 'hub' (a Hub dataset repo), 'url' or 'manual'")
    if hub is not None:
        if hub.count("/") != 1:
            raise where.error(f"'hub' must be OWNER/NAME, got {hub!r}")
        given = [k for k in ("path", "pattern", "parts", "parts_pattern") if raw.get(k) is not None]
        if len(given) != 1:
            raise where.error(
                "a 'hub' source needs exactly one of 'path', 'pattern', 'parts' or 'parts_pattern'"
            )
    elif parts_pattern is not None:
        raise where.error("'parts_pattern' only applies to 'hub' sources")
    if manual is None and url is not None and (path is not None or pattern is not None):
        raise where.error("a 'url' source takes the URL itself (or 'parts': a list of URLs), not 'path'")
    if url is not None and not url.startswith(("http://", "https://")):
        raise where.error(f"'url' must be http(s)://..., got {url!r}")
    if (pattern is not None or parts_pattern is not None) and not image:
        raise where.error("'pattern'/'parts_pattern' only apply to images")
    if parts is not None and (
        not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p for p in parts)
    ):
        raise where.error("'parts' must be a non-empty list of strings")
    revision = _str(where, raw, "revision", "main")
    if revision != "main" and hub is None:
        raise where.error("'revision' only applies to 'hub' sources")
    size, sha = _sizes(where, raw, len(parts) if parts else 1)
    approx, _ = _sizes(where, raw, len(parts) if parts else 1, "approx_size")
    if parts is None and any(isinstance(v, tuple) for v in (size, sha, approx)):
        raise where.error("'size'/'approx_size'/'sha256' lists only go with 'parts'")
    if (pattern is not None or parts_pattern is not None) and (size is not None or sha is not None):
        raise where.error(
            "'size'/'sha256' cannot be given for a pattern (the listing gives each file's size)"
        )
    flatten = raw.get("flatten", False)
    if not isinstance(flatten, bool):
        raise where.error(f"'flatten' must be true or false, got {flatten!r}")
    fmt = raw.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise where.error(f"'format' must be one of {list(FORMATS)}, got {fmt!r}")
    include = raw.get("include", [])
    if not isinstance(include, list) or not all(isinstance(g, str) and g for g in include):
        raise where.error("'include' must be a list of glob strings")
    strip = _str(where, raw, "strip")
    into = _str(where, raw, "into")
    name_column, name_template = _str(where, raw, "name_column"), _str(where, raw, "name_template")
    if name_column is not None and name_template is not None:
        raise where.error("give 'name_column' or 'name_template', not both")
    note = raw.get("note")
    if note is not None and not isinstance(note, str):
        raise where.error("'note' must be a string")
    return SourceFile(
        hub=hub,
        url=url,
        path=path,
        pattern=pattern,
        parts=tuple(parts or ()),
        parts_pattern=parts_pattern,
        manual=manual,
        revision=revision or "main",
        size=size,  # type: ignore[arg-type]
        approx_size=approx,  # type: ignore[arg-type]
        sha256=sha,  # type: ignore[arg-type]
        format=fmt,
        strip=_safe_rel(where, "strip", strip) if strip else "",
        into=_safe_rel(where, "into", into) if into else "",
        include=tuple(include),
        flatten=flatten,
        image_column=_str(where, raw, "image_column", "image") or "image",
        name_column=name_column,
        name_template=name_template,
        note=note,
    )


def parse_source(file: object, entry: str, raw: object, has_images: bool, has_url_source: bool) -> Source:
    """A dataset entry's `source` object, validated; errors name the file, the entry and the key."""
    where = _Where(file, entry, "")
    where.prefix = where.prefix.rstrip(".")
    if not isinstance(raw, dict):
        raise where.error("must be an object")
    unknown = sorted(set(raw) - {"meta_file", "url_list", "images", "note"})
    if unknown:
        raise where.error(f"unknown keys {unknown}; known: ['images', 'meta_file', 'note', 'url_list']")
    meta = None
    if raw.get("meta_file") is not None:
        meta = _parse_file(_Where(file, entry, "meta_file"), raw["meta_file"], image=False)
        if meta.manual is not None or meta.parts or meta.parts_pattern:
            raise _Where(file, entry, "meta_file").error("must be one 'hub' file (with 'path') or one 'url'")
    url_list = None
    if raw.get("url_list") is not None:
        if not has_url_source:
            raise _Where(file, entry, "url_list").error("only applies to an entry with a 'url_source'")
        url_list = _parse_file(_Where(file, entry, "url_list"), raw["url_list"], image=False)
        if url_list.manual is not None or url_list.parts:
            raise _Where(file, entry, "url_list").error("must be one 'hub' file (with 'path') or one 'url'")
    images = raw.get("images", [])
    if not isinstance(images, list):
        raise _Where(file, entry, "images").error("must be a list")
    if images and not has_images:
        raise _Where(file, entry, "images").error("a text-only entry (image_dir null) has no images")
    parsed = tuple(
        _parse_file(_Where(file, entry, f"images[{i}]"), s, image=True) for i, s in enumerate(images)
    )
    note = raw.get("note")
    if note is not None and not isinstance(note, str):
        raise where.error("'note' must be a string")
    return Source(meta, url_list, parsed, note)


def human_size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def source_summary(source: Source | None) -> str:
    """One cell for `ovis-data list`: where a dataset comes from and its recorded download size."""
    if source is None:
        return "-"
    files = [f for f in (source.meta_file, source.url_list, *source.images) if f is not None]
    kinds = sorted({f.kind for f in files})
    total, unknown = source.recorded_size()
    size = human_size(total) if total else ""
    if unknown:
        size = (size + " + " if size else "") + f"{unknown} unrecorded"
    return f"{'+'.join(kinds) or '-'}" + (f", {size}" if size else "")
