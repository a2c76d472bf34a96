"""Where the shipped dataset_info.json and stage recipes live (source checkout or installed wheel)."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def resource_path(name: str) -> Path:
    """Path of a top-level project resource: the checkout's copy first, then the wheel's bundled copy."""
    for base in (_PKG.parent, _PKG / "resources"):
        candidate = base / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"resource {name!r} not found beside {_PKG}")
