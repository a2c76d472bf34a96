"""`ovis-data fetch`: download a dataset's URL list into its image store, resumably and fast.

The names below load on first use: worker processes import `ovis_data.fetch.images`, which runs this file,
and must not pay for aiohttp, pyarrow and rich, which only the main process needs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SOURCES = {
    "FetchOptions": "options",
    "fetch_dataset": "api",
    "fetch_datasets": "api",
    "fetch_url_list": "api",
    "parse_part": "options",
    "ImageParams": "images",
    "NetParams": "net",
    "open_url_list": "reader",
    "FetchReport": "progress",
    "serve_app": "serve",
    "serve_directory": "serve",
}

__all__ = [
    "FetchOptions",
    "FetchReport",
    "ImageParams",
    "NetParams",
    "fetch_dataset",
    "fetch_datasets",
    "fetch_url_list",
    "open_url_list",
    "parse_part",
    "serve_app",
    "serve_directory",
]

if TYPE_CHECKING:
    from .api import fetch_dataset, fetch_datasets, fetch_url_list
    from .images import ImageParams
    from .net import NetParams
    from .options import FetchOptions, parse_part
    from .progress import FetchReport
    from .reader import open_url_list
    from .serve import serve_app, serve_directory


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value
