"""MappedArrow: a table read through a memory map whose pages trim() lets go, data unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ovis_data.arrowmap import MappedArrow


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (Linux smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            current = line.endswith(str(path))
        elif current and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_trim_lets_go_of_read_pages_and_keeps_the_data(tmp_path: Path):
    path = tmp_path / "t.arrow"
    values = np.arange(8 << 20, dtype=np.int64)  # 64 MiB
    table = pa.table({"v": values})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 20)
    m = MappedArrow(path)
    column = m.table.column("v")
    assert int(pc.sum(column).as_py()) == int(values.sum())  # every page read
    assert _mapped_kib(path) > 60 << 10
    m.trim()
    assert _mapped_kib(path) < 1 << 10
    assert column.to_numpy()[12345] == 12345 and int(pc.sum(column).as_py()) == int(values.sum())
