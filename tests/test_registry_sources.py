"""The shipped registry's `source` objects (where `ovis-data get` fetches each dataset from) are complete and
self-consistent. Checked on the raw JSON: the schema is the one docs/sources.md describes."""

import json
import re
from pathlib import Path

import pytest

from ovis_data.registry import load_registry
from ovis_data.resources import resource_path

HEX40 = re.compile(r"[0-9a-f]{40}")
HEX64 = re.compile(r"[0-9a-f]{64}")
FORMATS = {"zip", "tar", "parquet", "file"}
LOCATION_KEYS = {"hub", "url", "manual"}
FILE_KEYS = LOCATION_KEYS | {
    "path",
    "pattern",
    "parts",
    "parts_pattern",
    "revision",
    "size",
    "approx_size",
    "sha256",
    "format",
    "strip",
    "into",
    "include",
    "flatten",
    "image_column",
    "name_column",
    "name_template",
    "note",
}
REMOTE_KEYS = {"hub", "url", "path", "revision", "size", "approx_size", "sha256", "note"}


def _relative_dir_problems(value: object, key: str) -> list[str]:
    if not isinstance(value, str) or not value:
        return [f"{key} must be a non-empty string"]
    problems = []
    if not value.endswith("/"):
        problems.append(f"{key} {value!r} must end with '/'")
    if value.startswith("/") or "\\" in value or re.match(r"[A-Za-z]:", value):
        problems.append(f"{key} {value!r} must be a relative POSIX path")
    if any(part in ("", ".", "..") for part in value.rstrip("/").split("/")):
        problems.append(f"{key} {value!r} has an empty, '.' or '..' component")
    return problems


def _integrity_problems(spec: dict, count: int | None) -> list[str]:
    """size / approx_size: positive ints (for a parts list: lists aligned with it); sha256: hex digests."""
    problems = []
    for key in ("size", "approx_size", "sha256"):
        if key not in spec:
            continue
        value = spec[key]
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and (count is None or len(value) != count):
            problems.append(f"{key} is a list but not aligned with parts")
        for v in values:
            if key == "sha256":
                if not isinstance(v, str) or not HEX64.fullmatch(v):
                    problems.append(f"sha256 {v!r} is not 64 lowercase hex digits")
            elif not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{key} {v!r} is not a positive integer")
    return problems


def _revision_problems(spec: dict) -> list[str]:
    if "revision" not in spec:
        return []
    if "hub" not in spec:
        return ["revision only applies to hub sources"]
    rev = spec["revision"]
    if not isinstance(rev, str) or not rev or (re.fullmatch(r"[0-9a-f]+", rev) and not HEX40.fullmatch(rev)):
        return [f"revision {rev!r} must be a branch name or a full 40-digit commit"]
    return []


def remote_problems(spec: object) -> list[str]:
    """A meta_file / url_list source: one Hub file or one URL."""
    if not isinstance(spec, dict):
        return ["must be an object"]
    problems = [f"unknown key {k!r}" for k in sorted(set(spec) - REMOTE_KEYS)]
    if ("hub" in spec) == ("url" in spec):
        problems.append("needs exactly one of 'hub' or 'url'")
    if "hub" in spec and not (isinstance(spec.get("path"), str) and spec["path"]):
        problems.append("a hub source needs a 'path'")
    if "url" in spec and not str(spec["url"]).startswith(("https://", "http://")):
        problems.append("url must be http(s)")
    return problems + _revision_problems(spec) + _integrity_problems(spec, None)


def file_problems(spec: object) -> list[str]:
    """One entry of a source's `images` list."""
    if not isinstance(spec, dict):
        return ["must be an object"]
    problems = [f"unknown key {k!r}" for k in sorted(set(spec) - FILE_KEYS)]
    # A manual source may carry a "url" (the form or Drive link it tells the user to open).
    kinds = {"manual"} if "manual" in spec and "hub" not in spec else LOCATION_KEYS & set(spec)
    if len(kinds) != 1:
        return problems + [f"needs exactly one of {sorted(LOCATION_KEYS)}, has {sorted(kinds)}"]
    (kind,) = kinds
    count = None
    if kind == "hub":
        forms = {"path", "pattern", "parts", "parts_pattern"} & set(spec)
        if len(forms) != 1:
            problems.append(
                f"a hub source needs one of path/pattern/parts/parts_pattern, has {sorted(forms)}"
            )
    elif kind == "url":
        if not str(spec["url"]).startswith(("https://", "http://")):
            problems.append("url must be http(s)")
        if {"path", "pattern", "parts_pattern"} & set(spec):
            problems.append("a url source takes no path/pattern/parts_pattern")
    else:
        if not isinstance(spec["manual"], str) or len(spec["manual"]) < 40:
            problems.append("a manual source needs its instruction text")
        name = spec.get("path")
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            problems.append("a manual source needs 'path': a plain file name for ROOT/downloads/<dataset>/")
        if {"pattern", "parts", "parts_pattern", "revision"} & set(spec):
            problems.append("a manual source is one file (no pattern/parts/revision)")
    if "parts" in spec:
        parts = spec["parts"]
        if not isinstance(parts, list) or len(parts) < 2 or not all(isinstance(p, str) and p for p in parts):
            problems.append("parts must list at least two non-empty names")
        else:
            count = len(parts)
    for key in ("strip", "into"):
        if key in spec:
            problems += _relative_dir_problems(spec[key], key)
    if "include" in spec:
        inc = spec["include"]
        if not isinstance(inc, list) or not inc or not all(isinstance(g, str) and g for g in inc):
            problems.append("include must be a non-empty list of globs")
    if "flatten" in spec and not isinstance(spec["flatten"], bool):
        problems.append("flatten must be true or false")
    fmt = spec.get("format")
    if fmt is not None and fmt not in FORMATS:
        problems.append(f"format {fmt!r} not one of {sorted(FORMATS)}")
    parquet_keys = {"image_column", "name_column", "name_template"} & set(spec)
    if parquet_keys and fmt != "parquet":
        problems.append(f"{sorted(parquet_keys)} only apply to format 'parquet'")
    if {"name_column", "name_template"} <= set(spec):
        problems.append("name_column and name_template exclude each other")
    return problems + _revision_problems(spec) + _integrity_problems(spec, count)


def source_problems(name: str, entry: dict) -> list[str]:
    src = entry.get("source")
    if not isinstance(src, dict):
        return [f"{name}: no source object"]
    extra = sorted(set(src) - {"meta_file", "url_list", "images"})
    out = [f"{name}: source has unknown key {k!r}" for k in extra]
    if "meta_file" not in src:
        out.append(f"{name}: source has no meta_file")
    else:
        out += [f"{name}: meta_file: {p}" for p in remote_problems(src["meta_file"])]
    if "url_list" in src:
        if not entry.get("url_source"):
            out.append(f"{name}: url_list given for a dataset without url_source")
        out += [f"{name}: url_list: {p}" for p in remote_problems(src["url_list"])]
    images = src.get("images")
    if not isinstance(images, list):
        return out + [f"{name}: images must be a list"]
    if entry.get("image_dir") is None and images:
        out.append(f"{name}: a text-only dataset has no images to fetch")
    for i, spec in enumerate(images):
        out += [f"{name}: images[{i}]: {p}" for p in file_problems(spec)]
    return out


def _shipped() -> dict:
    return json.loads(Path(resource_path("dataset_info.json")).read_text(encoding="utf-8"))


def test_every_shipped_dataset_has_a_consistent_source():
    raw = _shipped()
    assert len(raw) == 19
    problems = [p for name, entry in raw.items() for p in source_problems(name, entry)]
    assert problems == []
    # The registry still loads with the new key (the get engine reads `source`; the loader accepts it).
    assert set(load_registry()) == set(raw)


def test_meta_files_come_from_the_ovis_dataset_repo_under_their_registry_names():
    for name, entry in _shipped().items():
        meta = entry["source"]["meta_file"]
        assert meta["hub"] == "AIDC-AI/Ovis-dataset", name
        assert meta["path"] == f"meta_files/v1/{entry['meta_file']}", name
        assert HEX40.fullmatch(meta["revision"]), name


def test_url_list_where_the_list_is_the_meta_file_itself():
    raw = _shipped()
    coyo = raw["coyo-10m"]
    assert coyo["url_source"]["url_list"] == coyo["meta_file"]
    assert coyo["source"]["url_list"] == coyo["source"]["meta_file"]
    assert coyo["source"]["images"] == []
    assert raw["allava-evol-instruct-143k"]["source"]["images"] == []


def test_datasets_sharing_an_image_dir_describe_a_shared_file_the_same_way():
    """Two entries that fill one image_dir from the same file must agree on how (strip, into, hashes):
    otherwise which one ran last would decide the tree."""
    seen: dict[tuple, tuple[str, dict]] = {}
    for name, entry in _shipped().items():
        for spec in entry["source"]["images"]:
            where = spec.get("hub") or spec.get("url") or spec.get("manual")
            what = spec.get("path") or spec.get("pattern") or spec.get("parts_pattern") or spec.get("parts")
            what = str(what)
            key = (entry["image_dir"], where, what)
            if key in seen:
                assert seen[key][1] == spec, f"{name} and {seen[key][0]} disagree on {key}"
            else:
                seen[key] = (name, spec)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"hub": "a/b", "path": "x.zip", "into": "../up/"}, "'..'"),
        ({"hub": "a/b", "path": "x.zip", "strip": "/abs/"}, "relative"),
        ({"hub": "a/b", "path": "x.zip", "into": "no_slash"}, "end with '/'"),
        ({"hub": "a/b", "path": "x.zip", "url": "https://h/x.zip"}, "exactly one of"),
        ({"hub": "a/b", "parts": ["a.001", "a.002"], "size": [1]}, "not aligned"),
        ({"hub": "a/b", "path": "x.zip", "revision": "2b4c280"}, "40-digit"),
        ({"hub": "a/b", "path": "x.zip", "sha256": "abc"}, "64 lowercase hex"),
        ({"manual": "x" * 50, "path": "sub/dir.zip"}, "plain file name"),
        ({"url": "https://h/x.zip", "image_column": "img"}, "only apply to format 'parquet'"),
        ({"hub": "a/b", "path": "x.zip", "intto": "a/"}, "unknown key"),
    ],
)
def test_the_checker_refuses_broken_sources(spec, needle):
    problems = file_problems(spec)
    assert any(needle in p for p in problems), problems
