"""`ovis-data fetch`: download a dataset's URL list into its image store, resumably and fast."""

from .engine import FetchOptions, fetch_dataset, fetch_datasets, fetch_url_list, parse_part
from .images import ImageParams
from .net import NetParams
from .reader import open_url_list
from .report import FetchReport
from .serve import serve_app, serve_directory

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
