"""A checkpoint's manifest: every file of `checkpoints/stepK/` with its size and sha256, written last.

DeepSpeed writes a checkpoint's files and then its `latest` marker, but a file can still be damaged
afterwards (a disk, a copy between machines, a partial sync), and a damaged `latest` left the run with no
way on: the previous checkpoint, intact, was never tried. With a manifest, `--resume` takes the newest
checkpoint whose files are all there with their sizes and hashes, and says why it passed over any newer.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "ovis-checkpoint.json"
FORMAT = "ovis-checkpoint-v1"
_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hashes(paths: list[Path]) -> list[str]:
    # hashlib releases the GIL: files hash in parallel (a 7B model's optimizer state is ~100 GB)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(file_sha256, paths))


def write(tag_dir: Path, step: int) -> Path:
    """The manifest of a complete checkpoint (call after every rank has written its files)."""
    paths = _files(tag_dir)
    files = {
        str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": h}
        for p, h in zip(paths, _hashes(paths), strict=True)
    }
    out = tag_dir / MANIFEST
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, out)  # present means complete
    return out


def problem(tag_dir: Path) -> str | None:
    """Why the checkpoint in `tag_dir` cannot be resumed from (None: every file as its manifest says)."""
    path = tag_dir / MANIFEST
    if not path.is_file():
        return "no manifest (the run stopped while writing it)"
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({e})"
    present: list[tuple[str, Path]] = []
    for name, entry in sorted(files.items()):
        p = tag_dir / name
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != entry.get("bytes"):
            return f"{p} has {size:,} bytes, its manifest {entry.get('bytes'):,}"
        present.append((name, p))
    for (name, p), h in zip(present, _hashes([p for _, p in present]), strict=True):
        if h != files[name].get("sha256"):
            return f"{p} does not match its sha256 in {path.name}"
    return None
