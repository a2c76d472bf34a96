"""DuckDB connections under a memory limit, for the stages that sort or join tables too big for memory
(validate's meta tables, pack's image indexes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import duckdb

from .errors import OvisDataError

# DuckDB holds the meta table, its joins and sorts; past this limit it spills them to a private folder
# under $TMPDIR, so a 10M-row meta file (every row bad or not) validates in bounded memory.
MEMORY_LIMIT_ENV = "OVIS_DUCKDB_MEMORY_LIMIT"
DEFAULT_MEMORY_LIMIT = "1GB"
THREAD_MEMORY = 128 << 20  # DuckDB threads need buffers of their own: one thread per this much of the limit
_UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


@contextlib.contextmanager
def bounded_connection() -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection under the memory limit, spilling to a folder removed on exit."""
    spill = tempfile.mkdtemp(prefix="ovis-duckdb-")
    limit = os.environ.get(MEMORY_LIMIT_ENV) or DEFAULT_MEMORY_LIMIT
    try:
        con = duckdb.connect(config={"memory_limit": limit, "temp_directory": spill})
    except duckdb.Error as e:
        shutil.rmtree(spill, ignore_errors=True)
        raise OvisDataError(f"{MEMORY_LIMIT_ENV}={limit!r}: not a DuckDB memory limit ({e})") from e
    try:
        number, unit = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0].split()
        threads = max(1, min(os.cpu_count() or 1, int(float(number) * _UNITS[unit]) // THREAD_MEMORY))
        con.execute(f"SET threads = {threads}")
        con.execute("SET preserve_insertion_order = true")
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
