"""ArrowRows: rows of an Arrow IPC file read by pread give what Arrow itself reads (numbers, strings, lists,
nulls, sliced batches), a sorted column is searched for the first equal row, and nothing stays mapped."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ovis_data.arrowmap import FENCE_ROWS, ArrowRows

SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("id", pa.string()),
        ("images", pa.list_(pa.string())),
        ("ids", pa.list_(pa.int32())),
        ("sup", pa.list_(pa.uint8())),
        ("score", pa.float32()),
        ("raw", pa.binary()),
    ]
)


def _write(path: Path, batches: list[pa.RecordBatch], schema: pa.Schema) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for b in batches:
            writer.write_batch(b)


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (Linux smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            current = line.endswith(str(path))
        elif current and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(0, 40))
        rows.append(
            {
                "row": None if i % 17 == 5 else i * 3,
                "id": None if i % 23 == 7 else f"s-{i}-ü" * int(rng.integers(0, 3)),
                "images": None
                if i % 19 == 3
                else [
                    None if j == 1 and i % 5 == 0 else f"im/{i}_{j}.jpg" for j in range(i % 4)
                ],  # fmt: skip
                "ids": rng.integers(-5, 150_000, k).astype(np.int32).tolist(),
                "sup": rng.integers(0, 2, k).astype(np.uint8).tolist(),
                "score": None if i % 7 == 2 else float(np.float32(i / 7)),
                "raw": bytes(rng.integers(0, 256, i % 9).astype(np.uint8)),
            }
        )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_rows_read_by_pread_equal_arrows_own(tmp_path: Path):
    table = _table(700, 0)
    # batches of several sizes, one empty, and slices (arrays with an offset into their buffers)
    batches = [*table.slice(0, 300).to_batches(), pa.RecordBatch.from_pylist([], schema=SCHEMA)]
    batches += [table.slice(300, 250).to_batches()[0], table.slice(550, 150).to_batches()[0].slice(0, 150)]
    path = tmp_path / "t.arrow"
    _write(path, batches, SCHEMA)
    rows = ArrowRows(path)
    assert len(rows) == 700
    expect = table.to_pylist()
    for i in range(700):
        got = dict(zip(SCHEMA.names, rows.read(i, SCHEMA.names), strict=True))
        for name in ("ids", "sup"):  # numpy arrays of the list's type
            assert got[name].dtype == np.dtype(SCHEMA.field(name).type.value_type.to_pandas_dtype())
            got[name] = got[name].tolist()
        assert got == expect[i], i
    with pytest.raises(IndexError):
        rows.read(700, ["row"])


def test_find_first_returns_the_first_of_equal_keys(tmp_path: Path):
    rng = np.random.default_rng(1)
    names = [f"d{int(x):06d}/é{int(x) % 7}.jpg" for x in rng.integers(0, 3000, 5000)]
    names += ["", "z", "d000001"]  # an empty key, and keys before and after the rest
    table = pa.table({"image_path": pa.array(names), "n": pa.array(np.arange(len(names)))})
    table = table.take(pc.sort_indices(table, [("image_path", "ascending"), ("n", "ascending")]))
    path = tmp_path / "index.arrow"
    # batches that are not multiples of the fence stride, so blocks end at batch ends
    _write(path, table.to_batches(max_chunksize=FENCE_ROWS * 3 + 41), table.schema)
    rows = ArrowRows(path)
    sorted_names = table.column("image_path").to_pylist()
    first = {}
    for i, name in enumerate(sorted_names):
        first.setdefault(name, i)
    for name, i in first.items():
        assert rows.find_first("image_path", name) == i
        assert rows.read(i, ["image_path"]) == [name]
    for absent in ("d000000/", "d9", "a", "d000001/x", "zz", "d000002/é2.jpg\x00"):
        if absent not in first:
            assert rows.find_first("image_path", absent) is None


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_reads_leave_nothing_mapped(tmp_path: Path):
    path = tmp_path / "big.arrow"
    values = pa.array(np.arange(8 << 20, dtype=np.int32))  # 32 MiB of list values
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, (8 << 20) + 1, 64, dtype=np.int32)), values)
    table = pa.table({"ids": lists})
    _write(path, table.to_batches(max_chunksize=1 << 14), table.schema)
    rows = ArrowRows(path)
    rng = np.random.default_rng(2)
    for i in rng.integers(0, len(rows), 2000).tolist():
        assert rows.read(i, ["ids"])[0][5] == 64 * i + 5
    assert _mapped_kib(path) == 0  # mapped only while the buffers' positions were found
