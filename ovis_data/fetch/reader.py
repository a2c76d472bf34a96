"""The URL list: a parquet read shard by shard (only the row groups a shard touches, only three columns)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ..errors import OvisDataError
from ..storage import AnyPath, RemotePath, as_path


def _parquet(path: AnyPath) -> pq.ParquetFile:
    """A URL list on object storage is read through ranged GETs (footer, then the row groups wanted)."""
    return pq.ParquetFile(path.open("rb") if isinstance(path, RemotePath) else path)


@dataclass(frozen=True)
class UrlList:
    path: AnyPath
    url_column: str
    image_path_column: str
    sha256_column: str | None
    total_rows: int

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.url_column, self.image_path_column, self.sha256_column) if c]


@dataclass
class ShardRows:
    start: int  # global index of the first row
    urls: list[str | None]
    image_paths: list[str | None]
    sha256: list[str | None]

    def __len__(self) -> int:
        return len(self.urls)


def open_url_list(
    path: str | Path | RemotePath, url_column: str, image_path_column: str, sha256_column: str | None = None
) -> UrlList:
    """Check the file and its columns from the footer alone (a 10M-row list is never loaded whole)."""
    path = as_path(path)
    try:
        meta = _parquet(path).metadata
    except FileNotFoundError as e:
        raise OvisDataError(f"{path}: URL list not found") from e
    except Exception as e:  # pyarrow raises ArrowInvalid & co for a non-parquet file
        raise OvisDataError(f"{path}: not a readable parquet file ({e})") from e
    names = set(meta.schema.names)
    missing = [c for c in (url_column, image_path_column, sha256_column) if c and c not in names]
    if missing:
        raise OvisDataError(f"{path}: missing column(s) {missing}; it has {sorted(names)}")
    return UrlList(path, url_column, image_path_column, sha256_column, meta.num_rows)


def shard_count(total_rows: int, shard_size: int) -> int:
    return (total_rows + shard_size - 1) // shard_size


def part_shards(n_shards: int, part: tuple[int, int]) -> range:
    """The i-th of n contiguous, near-equal slices of the shard numbers (0-based i)."""
    i, n = part
    return range(n_shards * i // n, n_shards * (i + 1) // n)


def read_rows(url_list: UrlList, start: int, stop: int) -> ShardRows:
    """Rows [start, stop): reads only the row groups that overlap them, batch by batch."""
    pf = _parquet(url_list.path)
    groups: list[int] = []
    first_row = 0  # global index of the first row of the first selected group
    offset = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > start and offset < stop:
            if not groups:
                first_row = offset
            groups.append(g)
        offset += n
    cols: dict[str, list] = {c: [] for c in url_list.columns}
    pos = first_row
    for batch in pf.iter_batches(batch_size=65_536, row_groups=groups, columns=url_list.columns):
        lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
        if lo < hi:
            part = batch.slice(lo, hi - lo)
            for c in url_list.columns:
                cols[c].extend(part.column(c).to_pylist())
        pos += batch.num_rows
        if pos >= stop:
            break
    n = len(cols[url_list.url_column])
    sha = cols[url_list.sha256_column] if url_list.sha256_column else [None] * n
    return ShardRows(start, cols[url_list.url_column], cols[url_list.image_path_column], sha)
