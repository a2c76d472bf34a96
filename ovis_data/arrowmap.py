"""Arrow IPC files read at random, one row at a time, by `os.pread` (`ArrowRows`).

Pack's shard writers read samples of the tokenized units and rows of a shards store's index at random.
Read through memory maps, each touch mapped the 64 KiB of cached file around it (the kernel's
fault-around), so a worker's RSS grew by the size of every file it read (10M captions: ~1.3 GB per
worker); letting go of those pages every few hundred samples (madvise MADV_DONTNEED) bounded the RSS but
made nearly every later read a page fault plus a zap: ~5-10 us per place touched, and a sample touches
~20 places (its tokens, mask, provenance, the index's bisection). How many of those touches were faults
grew with the files: on small files the samples of one trim window shared pages, on large ones they do not,
so the cost per row grew with the number of rows. Reading by pread costs the same whatever the files'
size and whatever was read before, and maps nothing: the RSS is what the process allocated.

The file is memory-mapped once, to find where each batch's buffers lie (Arrow's reader touches only the
metadata); the map is dropped when the positions are known.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FENCE_ROWS = 256  # a sorted column's key is kept in memory every this many rows (find_first)


class MappedArrow:
    """The table of an Arrow IPC file, its buffers pointing into a read-only memory map of the file."""

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        whole = pa.py_buffer(self._map)
        self.address, self.size = whole.address, whole.size  # a buffer lies at (its address - address)
        self.table: pa.Table = pa.ipc.open_file(pa.BufferReader(whole)).read_all()


@dataclass(frozen=True)
class _Column:
    """Where one batch's array lies in the file: its row offset, validity bitmap (None: no nulls), value
    offsets (variable-size types), data (fixed-size values or bytes) and child (lists)."""

    kind: str  # "fixed" | "string" | "list"
    offset: int
    validity: int | None
    offsets: int | None
    data: int | None
    itemsize: int
    dtype: np.dtype | None
    child: _Column | None
    scalar: struct.Struct | None = None  # one fixed-size value, little-endian as Arrow stores it


_PAIR = struct.Struct("<2i")  # a variable-size item's two offsets
_STRUCT_CODES = {"i": "bhiq", "u": "BHIQ", "f": "?efd"}  # by numpy kind, then log2 of the item size


def _column(arr: pa.Array, file: tuple[int, int]) -> _Column:
    """`file`: the map's address and size (a buffer outside it, e.g. decompressed, cannot be pread)."""

    def at(buf: pa.Buffer | None) -> int | None:
        if buf is None:
            return None
        pos = buf.address - file[0]
        if buf.size and not 0 <= pos <= file[1] - buf.size:
            raise ValueError("ArrowRows reads uncompressed IPC files only (a buffer lies outside the file)")
        return pos

    t, bufs = arr.type, arr.buffers()
    validity = at(bufs[0]) if arr.null_count else None
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return _Column("string", arr.offset, validity, at(bufs[1]), at(bufs[2]), 1, None, None)
    if pa.types.is_list(t):
        child = _column(arr.values, file)  # .values: the whole child, which the offsets index
        return _Column("list", arr.offset, validity, at(bufs[1]), None, 0, None, child)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        dtype = np.dtype(t.to_pandas_dtype())
        scalar = struct.Struct("<" + _STRUCT_CODES[dtype.kind][dtype.itemsize.bit_length() - 1])
        return _Column("fixed", arr.offset, validity, None, at(bufs[1]), dtype.itemsize, dtype, None, scalar)
    raise TypeError(f"ArrowRows reads int, float, string, binary and list columns, not {t}")


class ArrowRows:
    """Rows of an Arrow IPC file (int, float, string and list columns; 32-bit offsets), read by pread."""

    def __init__(self, path: str | os.PathLike, columns: list[str] | None = None):
        self.path, self._fd = str(path), -1
        mapped = MappedArrow(path)
        table = mapped.table
        self.schema = table.schema
        names = columns or table.schema.names
        types = {n: table.schema.field(n).type for n in names}  # str, not bytes, for strings and their lists
        self._string = {
            n: pa.types.is_string(t.value_type if pa.types.is_list(t) else t) for n, t in types.items()
        }
        self._batches: list[dict[str, _Column]] = []
        starts = [0]
        for b in table.to_batches():
            self._batches.append({n: _column(b.column(n), (mapped.address, mapped.size)) for n in names})
            starts.append(starts[-1] + b.num_rows)
        self.starts = starts  # first row of each batch, then the number of rows
        self._fences: dict[str, tuple[list[bytes], list[int]]] = {}
        del table, mapped  # the map goes with its last buffer: nothing of the file stays mapped
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.starts[-1]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------------
    def _read(self, pos: int, n: int) -> bytes:
        data = os.pread(self._fd, n, pos) if n else b""
        if len(data) != n:
            raise OSError(f"{self.path}: short read at offset {pos} ({len(data)} of {n} bytes)")
        return data

    def _locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < self.starts[-1]:
            raise IndexError(f"row {row} of {self.path} ({self.starts[-1]} rows)")
        k = bisect.bisect_right(self.starts, row) - 1
        return k, row - self.starts[k]

    def _valid(self, col: _Column, i: int) -> bool:
        if col.validity is None:
            return True
        j = col.offset + i
        return bool(self._read(col.validity + j // 8, 1)[0] >> (j % 8) & 1)

    def _span(self, col: _Column, i: int, n: int = 1) -> tuple[int, ...]:
        """Offsets i..i+n of a variable-size column."""
        assert col.offsets is not None
        raw = self._read(col.offsets + 4 * (col.offset + i), 4 * (n + 1))
        return _PAIR.unpack(raw) if n == 1 else struct.unpack(f"<{n + 1}i", raw)

    def _cell(self, col: _Column, i: int, string: bool):
        """Item i of a column as Python: a number, str (bytes where not `string`), None when null; a list
        column's item: a numpy array (read-only) of numbers, or a list of str/bytes/None."""
        if not self._valid(col, i):
            return None
        if col.kind == "fixed":
            assert col.data is not None and col.scalar is not None
            return col.scalar.unpack(self._read(col.data + col.itemsize * (col.offset + i), col.itemsize))[0]
        a, z = self._span(col, i)
        if col.kind == "string":
            assert col.data is not None
            raw = self._read(col.data + a, z - a)
            return raw.decode() if string else raw
        child = col.child
        assert child is not None
        if child.kind == "fixed":
            assert child.data is not None and child.dtype is not None
            raw = self._read(child.data + child.itemsize * (child.offset + a), child.itemsize * (z - a))
            return np.frombuffer(raw, child.dtype)
        if child.kind != "string":
            raise TypeError("lists of lists are not read")
        if z == a:
            return []
        assert child.data is not None
        ends = self._span(child, a, z - a)
        raw = self._read(child.data + ends[0], ends[-1] - ends[0])
        out: list = []
        for j in range(z - a):
            piece = raw[ends[j] - ends[0] : ends[j + 1] - ends[0]]
            out.append((piece.decode() if string else piece) if self._valid(child, a + j) else None)
        return out

    def read(self, row: int, names: list[str] | tuple[str, ...]) -> list:
        """The cells of `names` in one row (see _cell for their Python types)."""
        k, i = self._locate(row)
        cols = self._batches[k]
        return [self._cell(cols[n], i, self._string[n]) for n in names]

    # -- a sorted column --------------------------------------------------------------------------------
    def find_first(self, name: str, key: str) -> int | None:
        """The first row whose string column `name` equals key, the column being sorted (byte order, as
        DuckDB sorts VARCHAR); None when absent. In memory: the column's key every FENCE_ROWS rows (built
        on first use, one pass over the column); per search: a bisection of those, then one block of
        FENCE_ROWS rows read by pread and bisected, whatever the number of rows."""
        if name not in self._fences:
            self._fences[name] = self._build_fences(name)
        keys, rows = self._fences[name]
        target = key.encode()
        f = max(0, bisect.bisect_left(keys, target) - 1)  # keys[f] < target <= keys[f + 1]: the first match
        # lies in block f or is the first row of block f + 1
        for block in (f, f + 1):
            if block >= len(keys):
                return None
            found = self._first_at_least(name, rows[block], target)
            if found is not None:
                return found[0] if found[1] == target else None
        return None

    def _build_fences(self, name: str) -> tuple[list[bytes], list[int]]:
        keys: list[bytes] = []
        rows: list[int] = []
        mapped = MappedArrow(self.path)  # the column's pages leave with the map
        for start, b in zip(self.starts, mapped.table.to_batches(), strict=False):
            if not b.num_rows:
                continue
            picks = np.arange(0, b.num_rows, FENCE_ROWS)
            col = b.column(name)
            if col.null_count:
                raise ValueError(f"{self.path}: column {name} has nulls, it cannot be searched")
            keys += pc.take(col, pa.array(picks)).cast(pa.binary()).to_pylist()
            rows += (start + picks).tolist()
        del mapped
        return keys, rows

    def _first_at_least(self, name: str, row: int, target: bytes) -> tuple[int, bytes] | None:
        """The first row >= target and its key, among the block of rows starting at `row` (within one
        batch)."""
        k, i = self._locate(row)
        col = self._batches[k][name]
        n = min(FENCE_ROWS, self.starts[k + 1] - self.starts[k] - i)
        ends = self._span(col, i, n)
        assert col.data is not None
        raw = self._read(col.data + ends[0], ends[-1] - ends[0])

        def key(j: int) -> bytes:
            return raw[ends[j] - ends[0] : ends[j + 1] - ends[0]]

        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if key(mid) < target:
                lo = mid + 1
            else:
                hi = mid
        return (row + lo, key(lo)) if lo < n else None
