"""`ovis-data validate`: check meta files against image stores, write catalogs and a report.

Everything per sample runs as DuckDB SQL over the normalized meta table (meta-only checks) plus one
directory walk per image_dir (existence as a join, never a stat per sample); image headers or full
decodes run in worker processes over the unique image paths only (in this process for a small set).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..duck import bounded_connection
from ..errors import OvisDataError
from ..imagestore import ImageStore, index_file, load_index, unsafe_path_sql
from ..poolsize import workers_for
from ..registry import DatasetSpec
from ..storage import RemotePath, local_copy
from .catalog import (
    CATALOG_SCHEMA,
    catalog_dir,
    catalog_path,
    check_catalog_current,
    meta_file_identity,
    rejected_path,
)
from .imagecheck import SMALL_SET, ImageLimits, check_images
from .metafile import MetaFileError, load_meta

MODES = ("meta", "header", "deep")
MAX_CHUNK = 256  # images per worker task: large enough to amortize IPC, small enough for smooth progress
ProgressFn = Callable[[str, int, int], None]  # (dataset, images done, images total)


@dataclass
class DatasetResult:
    name: str
    total: int = 0
    good: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # dataset-level problem: "reason: file: detail" (meta file, image_dir)
    catalog_written: bool = False  # False when the meta file was unusable: catalogs left as they were

    @property
    def bad(self) -> int:
        return self.total - self.good

    def to_json(self) -> dict:
        out = {"total": self.total, "good": self.good, "bad": self.bad, "by_reason": self.by_reason}
        if self.error:
            out["error"] = self.error
        return out


# Each image of a sample still in the running, with why its path is unsafe (imagestore's rules), if it is.
_PATH_SQL = f"""
CREATE OR REPLACE TEMP TABLE img AS
WITH u AS (
  SELECT row, generate_subscripts(images, 1) AS idx, unnest(images) AS raw_path
  FROM meta WHERE reason IS NULL AND len(images) > 0
)
SELECT row, idx, raw_path AS path, {unsafe_path_sql("raw_path")} AS unsafe
FROM u
"""


def mark_paths(con: duckdb.DuckDBPyConnection, store: ImageStore) -> dict:
    """Reason for each image that escapes image_dir or is absent (existence as one join). Returns the
    identity of the store as checked: layout, number of images, an order-free hash of their names."""
    con.execute(_PATH_SQL)
    index = index_file(store.image_dir) if store.layout == "shards" else None
    if index is not None:  # DuckDB scans the index itself: its 10M names never sit in this process
        con.execute(
            "CREATE OR REPLACE TEMP VIEW files AS SELECT image_path, false AS linked_out "
            f"FROM read_parquet('{_sql_text(index)}')"
        )
    else:
        con.register("files", store.listing())
    n, names = con.execute(
        "SELECT count(*), coalesce(bit_xor(md5_number_lower(image_path)), 0) FROM files"
    ).fetchall()[0]
    identity = {"path": str(store.image_dir), "layout": store.layout, "images": n}
    identity["names_hash"] = f"{names:016x}"
    # One rewrite of the table, not UPDATEs: DuckDB keeps what an UPDATE changes in memory (10M rows of
    # missing images), while a table written by a query spills under the memory limit.
    con.execute(
        """CREATE OR REPLACE TEMP TABLE img AS
           SELECT i.row, i.idx, i.path,
             CASE WHEN i.unsafe IS NOT NULL THEN 'unsafe_path' WHEN f.image_path IS NULL THEN 'missing_image'
                  WHEN f.linked_out THEN 'unsafe_path' END AS reason,
             CASE WHEN i.unsafe IS NOT NULL THEN i.unsafe WHEN f.image_path IS NULL THEN 'no such file'
                  WHEN f.linked_out THEN 'symbolic link out of image_dir' END AS detail,
             NULL::INTEGER AS width, NULL::INTEGER AS height
           FROM img i LEFT JOIN (SELECT image_path, bool_or(linked_out) AS linked_out FROM files
                                 GROUP BY image_path) f
             ON i.unsafe IS NULL AND f.image_path = i.path"""
    )
    if index is not None:
        con.execute("DROP VIEW files")
    else:
        con.unregister("files")
    return identity


def _sql_text(path: Path) -> str:
    return str(path).replace("'", "''")


HEADER_SCHEMA = pa.schema(
    [("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("reason", pa.string()),
     ("detail", pa.string())]
)  # fmt: skip
HEADER_ROWS = 65536  # results gathered before they go to disk as one row group


def _check_headers(
    con: duckdb.DuckDBPyConnection,
    spec: DatasetSpec,
    store: ImageStore,
    deep: bool,
    limits: ImageLimits,
    processes: int | None,
    progress: ProgressFn | None,
    ray: str | None = None,
) -> None:
    """Open (or fully decode) every unique image still good, in worker processes (or Ray tasks: `ray`, a
    cluster's address), and record the result."""
    index = index_file(store.image_dir) if store.layout == "shards" else None
    if store.layout == "shards":
        if index is not None:  # scanned by DuckDB, never loaded here
            source = f"read_parquet('{_sql_text(index)}')"
        else:
            con.register("idx", load_index(store.image_dir))
            source = "idx"
        query = f"""SELECT DISTINCT i.path, x.tar, x."offset", x.size FROM img i JOIN {source} x
                   ON x.image_path = i.path WHERE i.reason IS NULL ORDER BY i.path"""
    else:
        query = "SELECT DISTINCT path, NULL, -1, 0 FROM img WHERE reason IS NULL ORDER BY path"
    total = con.execute(f"SELECT count(*) FROM ({query})").fetchall()[0][0]
    workers = workers_for(processes, total, SMALL_SET[deep])
    base = str(store.image_dir)
    pending: deque[pa.Array] = deque()  # paths of the chunks handed out, in order, results not yet back

    def chunks():
        # Several tasks per worker even for small sets, or one slow chunk leaves the other cores idle.
        chunk = max(16, min(MAX_CHUNK, -(-total // (workers * 8))))
        reader = con.sql(query).to_arrow_reader(chunk)
        for batch in reader:
            cols = batch.to_pydict()
            names = list(cols)
            p, tar, off, size = (cols[n] for n in names)
            pending.append(batch.column(0).cast(pa.string()))
            if store.layout == "shards":
                yield [(os.path.join(base, t), o, s) for t, o, s in zip(tar, off, size, strict=True)]
            else:
                yield [(os.path.join(base, x), -1, 0) for x in p]

    # Results go to a parquet file as they come (10M images must not sit in memory, as Python objects
    # or as Arrow), which DuckDB then joins under its memory limit.
    with tempfile.TemporaryDirectory(prefix="ovis-headers-") as tmp:
        results = Path(tmp) / "headers.parquet"
        with pq.ParquetWriter(results, HEADER_SCHEMA) as writer:
            buffered: list[pa.RecordBatch] = []
            done = 0
            for res in check_images(chunks(), deep, limits, workers, ray=ray):
                w, h, r, d = zip(*res, strict=True) if res else ((), (), (), ())
                batch = [pending.popleft(), pa.array(w, pa.int32()), pa.array(h, pa.int32())]
                batch += [pa.array(r, pa.string()), pa.array(d, pa.string())]
                buffered.append(pa.record_batch(batch, schema=HEADER_SCHEMA))
                if sum(b.num_rows for b in buffered) >= HEADER_ROWS:
                    writer.write_table(pa.Table.from_batches(buffered, HEADER_SCHEMA))
                    buffered.clear()
                done += len(res)
                if progress:
                    progress(spec.name, done, total)
            writer.write_table(pa.Table.from_batches(buffered, HEADER_SCHEMA))
        if store.layout == "shards" and index is None:
            con.unregister("idx")
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE img AS
                SELECT i.row, i.idx, i.path,
                  CASE WHEN h.path IS NULL THEN i.reason ELSE h.reason END AS reason,
                  CASE WHEN h.path IS NULL THEN i.detail ELSE h.detail END AS detail,
                  h.width, h.height
                FROM img i LEFT JOIN (SELECT DISTINCT ON (path) * FROM read_parquet('{_sql_text(results)}')) h
                  ON i.reason IS NULL AND h.path = i.path"""
        )


def fold_images_into_samples(con: duckdb.DuckDBPyConnection, with_sizes: bool) -> None:
    """A sample takes the reason of its first bad image; good samples get their image sizes."""
    sizes, lists = "", ""
    if with_sizes:
        sizes = """, CASE WHEN b.row IS NOT NULL AND b.reason IS NULL AND m.reason IS NULL THEN b.widths
                ELSE m.widths END AS widths,
           CASE WHEN b.row IS NOT NULL AND b.reason IS NULL AND m.reason IS NULL THEN b.heights
                ELSE m.heights END AS heights"""
        lists = ", list(width ORDER BY idx) AS widths, list(height ORDER BY idx) AS heights"
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE meta AS
            SELECT m.* REPLACE (
              CASE WHEN b.reason IS NULL THEN m.reason ELSE b.reason END AS reason,
              CASE WHEN b.reason IS NULL THEN m.detail ELSE b.detail END AS detail{sizes})
            FROM meta m LEFT JOIN (
              SELECT row,
                arg_min(reason, idx) FILTER (WHERE reason IS NOT NULL) AS reason,
                arg_min(path || ': ' || detail, idx) FILTER (WHERE reason IS NOT NULL) AS detail{lists}
              FROM img GROUP BY row) b ON b.row = m.row"""
    )


def mark_duplicates(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE dup AS SELECT id, min(row) AS first_row FROM meta GROUP BY id "
                "HAVING count(*) > 1")  # fmt: skip
    if con.execute("SELECT count(*) FROM dup").fetchall()[0][0]:  # a rewrite, not an UPDATE: see mark_paths
        con.execute(
            """CREATE OR REPLACE TEMP TABLE meta AS
               SELECT m.* REPLACE (
                 CASE WHEN m.reason IS NULL AND d.id IS NOT NULL THEN 'duplicate_id' ELSE m.reason END
                   AS reason,
                 CASE WHEN m.reason IS NULL AND d.id IS NOT NULL
                   THEN 'id ' || to_json(m.id)::VARCHAR || ' first seen at row ' || d.first_row::VARCHAR
                   ELSE m.detail END AS detail)
               FROM meta m LEFT JOIN dup d ON d.id = m.id AND d.first_row <> m.row"""
        )
    con.execute("DROP TABLE dup")


def _write_outputs(
    con: duckdb.DuckDBPyConnection, spec: DatasetSpec, root: Path, out: Path | None, mode: str, source: dict
) -> None:
    """Catalog and rejected rows, both written to temporary names and only then renamed: a run that
    fails leaves the pair as it was, never half a file nor a catalog beside another run's rejects.
    Both record `source` (the meta file and image store they were made from) for pack's staleness check.

    Sizes were folded into `meta` beforehand, so the output is a scan and one sort: no join.
    """
    directory = catalog_dir(root, out)
    directory.mkdir(parents=True, exist_ok=True)
    # DuckDB writes local files: an object store's catalogs are written beside this process, then put
    local_dir = Path(tempfile.mkdtemp(prefix="ovis-catalog-")) if isinstance(directory, RemotePath) else None
    cols = ", ".join(f.name for f in CATALOG_SCHEMA)
    targets = [
        (
            catalog_path(root, spec.name, out),
            f"SELECT {cols} FROM (SELECT $dataset AS dataset, * FROM meta WHERE reason IS NULL) ORDER BY row",
        ),
        (
            rejected_path(root, spec.name, out),
            # images too: the data report shows a rejected sample's picture where its file exists
            """SELECT $dataset AS dataset, row, id, reason, detail, images FROM meta
               WHERE reason IS NOT NULL ORDER BY row""",
        ),
    ]
    done = []
    try:
        for path, query in targets:
            tmp = (local_dir or path.parent) / f".{path.name}.tmp"
            done.append((tmp, path))
            target = str(tmp).replace("'", "''")
            con.execute(
                f"COPY ({query}) TO '{target}' (FORMAT parquet, KV_METADATA "
                "{ovis_check: $mode, ovis_source: $source})",
                {"dataset": spec.name, "mode": mode, "source": json.dumps(source, sort_keys=True)},
            )
        for tmp, path in done:
            if isinstance(path, RemotePath):
                path.put_file(tmp)  # one whole object each
            else:
                os.replace(tmp, path)
    finally:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
        if local_dir is not None:
            shutil.rmtree(local_dir, ignore_errors=True)


def validate_dataset(
    spec: DatasetSpec,
    root: Path,
    mode: str = "header",
    limits: ImageLimits | None = None,
    processes: int | None = None,
    catalog_out: Path | None = None,
    progress: ProgressFn | None = None,
    ray: str | None = None,
) -> DatasetResult:
    """Validate one dataset; writes its catalog and rejected rows. Dataset-level problems go in .error.
    With `ray` (a Ray cluster's address) the per-image checks run as Ray tasks; the rest stays here."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    limits = limits or ImageLimits()
    result = DatasetResult(spec.name)
    meta_path = spec.meta_path(root)
    if not meta_path.is_file():
        result.error = f"meta_file_missing: {meta_path}"
        return result
    opened = contextlib.ExitStack()
    con = opened.enter_context(bounded_connection())
    try:
        # Taken before reading: a file changed while it is read is then stale, never trusted.
        source: dict = {"meta_file": meta_file_identity(meta_path), "image_store": None}
        try:
            with local_copy(meta_path) as local_meta:  # DuckDB reads a local file (a copy for a URL)
                result.total = load_meta(con, spec, local_meta)
        except MetaFileError as e:
            result.error = f"{e.reason}: {e.path}: {e.detail}"
            return result
        # Text-only samples have no sizes to learn: an empty list; otherwise null until images are read.
        con.execute(
            """CREATE OR REPLACE TEMP TABLE meta AS SELECT *,
                 CASE WHEN len(images) = 0 THEN []::INTEGER[] END AS widths,
                 CASE WHEN len(images) = 0 THEN []::INTEGER[] END AS heights
               FROM meta"""
        )
        mark_duplicates(con)
        image_dir = spec.image_path(root)
        if image_dir is not None and not image_dir.is_dir():
            result.error = f"image_dir_missing: {image_dir}"
            con.execute(
                """CREATE OR REPLACE TEMP TABLE meta AS SELECT * REPLACE (
                     CASE WHEN reason IS NULL AND len(images) > 0 THEN 'image_dir_missing' ELSE reason END
                       AS reason,
                     CASE WHEN reason IS NULL AND len(images) > 0 THEN $dir ELSE detail END AS detail)
                   FROM meta""",
                {"dir": str(image_dir)},
            )
        elif image_dir is not None:
            store = ImageStore(image_dir)
            source["image_store"] = mark_paths(con, store)
            if mode != "meta":
                _check_headers(con, spec, store, mode == "deep", limits, processes, progress, ray)
            fold_images_into_samples(con, with_sizes=mode != "meta")
        _write_outputs(con, spec, root, catalog_out, mode, source)
        result.catalog_written = True
        rows = con.execute(
            "SELECT reason, count(*) FROM meta WHERE reason IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
        result.by_reason = {r: n for r, n in rows}
        result.good = result.total - sum(result.by_reason.values())
        return result
    finally:
        opened.close()


def ensure_catalog(spec: DatasetSpec, root: Path, processes: int | None = None) -> Path:
    """The dataset's catalog for packing: validated now (header checks) when there is none yet; one older
    than its meta file is refused, so no sample of a changed meta file is packed unchecked."""
    path = catalog_path(root, spec.name)
    if path.exists():
        check_catalog_current(path, spec.name, spec.meta_path(root))
        return path
    result = validate_dataset(spec, root, processes=processes)
    if result.error:
        raise OvisDataError(f"{spec.name}: cannot validate before packing: {result.error}")
    if not path.exists():
        raise OvisDataError(f"{spec.name}: validation wrote no catalog at {path}")
    return path
