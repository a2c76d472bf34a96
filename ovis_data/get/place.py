"""Where get keeps its state, and how extracted files reach image_dir.

A source is extracted into image_dir/.get/staging/<key>/ (same filesystem, so placing is a rename per
file), merged into image_dir, and only then its done-marker image_dir/.get/done/<key>.json is written.
A run killed at any moment left at most a staging folder (cleared by the next run) or files already
renamed into place (the next run renames the same files over them): the re-run ends in the same tree. A
meta file or URL list is renamed into ROOT/meta_files/ whole, its marker in ROOT/meta_files/.get/.
Markers hold no times, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..imagestore import GET_BOOKKEEPING


def staging_dir(image_dir: Path, key: str) -> Path:
    return image_dir / GET_BOOKKEEPING / "staging" / key


def image_marker(image_dir: Path, key: str) -> Path:
    return image_dir / GET_BOOKKEEPING / "done" / f"{key}.json"


def file_marker(target: Path) -> Path:
    return target.parent / GET_BOOKKEEPING / f"{target.name}.json"


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn or absent marker: the source is simply not done


def write_marker(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clear(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def merge(staging: Path, image_dir: Path) -> None:
    """Rename everything under staging into image_dir (replacing files of the same name), then drop
    staging. Folders are made as needed; a folder in the way of a file (or the reverse) is an error."""
    stack = [Path()]
    while stack:
        rel = stack.pop()
        (image_dir / rel).mkdir(parents=True, exist_ok=True)
        with os.scandir(staging / rel) as it:
            for entry in it:
                sub = rel / entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(sub)
                    continue
                dest = image_dir / sub
                if dest.is_dir() and not dest.is_symlink():
                    raise OSError(f"{dest} is a folder, the archive has a file of that name")
                os.replace(entry.path, dest)
    shutil.rmtree(staging)
