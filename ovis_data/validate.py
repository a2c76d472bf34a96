"""`ovis-data validate`: check meta files against image stores, write catalogs and a report.

Everything per sample runs as DuckDB SQL over the normalized meta table (meta-only checks) plus one
directory walk per image_dir (existence as a join, never a stat per sample); image headers or full
decodes run in worker processes over the unique image paths only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from .catalog import CATALOG_SCHEMA, catalog_dir, catalog_path, meta_file_identity, rejected_path
from .imagecheck import ImageLimits, check_images
from .imagestore import ImageStore, load_index
from .metafile import MetaFileError, load_meta
from .registry import DatasetSpec
from .storage import RemotePath, local_copy

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


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = true")
    return con


# The vectorized twin of imagestore.unsafe_path_reason (which fetch and the readers use per path):
# keep the two rules in step.
_PATH_SQL = """
CREATE OR REPLACE TEMP TABLE img AS
WITH u AS (
  SELECT row, generate_subscripts(images, 1) AS idx, unnest(images) AS raw_path
  FROM meta WHERE reason IS NULL AND len(images) > 0
)
SELECT row, idx, raw_path AS path,
  CASE
    WHEN raw_path = '' THEN 'empty path'
    WHEN starts_with(raw_path, '/') OR starts_with(raw_path, '\\') OR regexp_matches(raw_path, '^[A-Za-z]:')
      THEN 'absolute path'
    WHEN list_contains(string_split(replace(raw_path, '\\', '/'), '/'), '..') THEN '''..'' segment'
    WHEN contains(raw_path, chr(0)) THEN 'NUL byte in path'
  END AS unsafe,
  NULL::VARCHAR AS reason, NULL::VARCHAR AS detail, NULL::INTEGER AS width, NULL::INTEGER AS height
FROM u
"""


def _mark_paths(con: duckdb.DuckDBPyConnection, store: ImageStore) -> dict:
    """Reason for each image that escapes image_dir or is absent (existence as one join). Returns the
    identity of the store as checked: layout, number of images, an order-free hash of their names."""
    con.execute(_PATH_SQL)
    con.execute("UPDATE img SET reason = 'unsafe_path', detail = unsafe WHERE unsafe IS NOT NULL")
    con.register("files", store.listing())
    n, names = con.execute(
        "SELECT count(*), coalesce(bit_xor(md5_number_lower(image_path)), 0) FROM files"
    ).fetchall()[0]
    identity = {"path": str(store.image_dir), "layout": store.layout, "images": n}
    identity["names_hash"] = f"{names:016x}"
    con.execute(
        """UPDATE img SET reason = CASE WHEN f.linked_out THEN 'unsafe_path' ELSE NULL END,
             detail = CASE WHEN f.linked_out THEN 'symbolic link out of image_dir' ELSE NULL END
           FROM files f WHERE img.reason IS NULL AND f.image_path = img.path"""
    )
    con.execute(
        """UPDATE img SET reason = 'missing_image', detail = 'no such file'
           WHERE reason IS NULL AND path NOT IN (SELECT image_path FROM files)"""
    )
    con.unregister("files")
    return identity


def _check_headers(
    con: duckdb.DuckDBPyConnection,
    spec: DatasetSpec,
    store: ImageStore,
    deep: bool,
    limits: ImageLimits,
    processes: int | None,
    progress: ProgressFn | None,
) -> None:
    """Open (or fully decode) every unique image still good, in worker processes, and record the result."""
    if store.layout == "shards":
        con.register("idx", load_index(store.image_dir))
        query = """SELECT DISTINCT i.path, x.tar, x."offset", x.size FROM img i JOIN idx x
                   ON x.image_path = i.path WHERE i.reason IS NULL ORDER BY i.path"""
    else:
        query = "SELECT DISTINCT path, NULL, -1, 0 FROM img WHERE reason IS NULL ORDER BY path"
    total = con.execute(f"SELECT count(*) FROM ({query})").fetchall()[0][0]
    base = str(store.image_dir)
    paths: list[pa.Array] = []

    def chunks():
        # Several tasks per worker even for small sets, or one slow chunk leaves the other cores idle.
        workers = processes or os.cpu_count() or 1
        chunk = max(16, min(MAX_CHUNK, -(-total // (workers * 8))))
        reader = con.sql(query).to_arrow_reader(chunk)
        for batch in reader:
            cols = batch.to_pydict()
            names = list(cols)
            p, tar, off, size = (cols[n] for n in names)
            paths.append(pa.array(p, pa.string()))
            if store.layout == "shards":
                yield [(os.path.join(base, t), o, s) for t, o, s in zip(tar, off, size, strict=True)]
            else:
                yield [(os.path.join(base, x), -1, 0) for x in p]

    # Results are kept as Arrow arrays per chunk: 10M images must not become 40M Python objects.
    parts: dict[str, list[pa.Array]] = {"width": [], "height": [], "reason": [], "detail": []}
    done = 0
    for res in check_images(chunks(), deep, limits, processes):
        w, h, r, d = zip(*res, strict=True) if res else ((), (), (), ())
        parts["width"].append(pa.array(w, pa.int32()))
        parts["height"].append(pa.array(h, pa.int32()))
        parts["reason"].append(pa.array(r, pa.string()))
        parts["detail"].append(pa.array(d, pa.string()))
        done += len(res)
        if progress:
            progress(spec.name, done, total)
    if store.layout == "shards":
        con.unregister("idx")
    types = {"path": pa.string(), "width": pa.int32(), "height": pa.int32(), "reason": pa.string()}
    parts["path"] = paths
    table = pa.table(
        {k: pa.concat_arrays(v) if v else pa.array([], types.get(k, pa.string())) for k, v in parts.items()}
    )
    con.register("hdr", table)
    con.execute(
        """UPDATE img SET reason = h.reason, detail = h.detail, width = h.width, height = h.height
           FROM hdr h WHERE img.reason IS NULL AND img.path = h.path"""
    )
    con.unregister("hdr")


def _fold_images_into_samples(con: duckdb.DuckDBPyConnection, with_sizes: bool) -> None:
    """A sample takes the reason of its first bad image; good samples get their image sizes."""
    con.execute(
        """UPDATE meta SET reason = b.reason, detail = b.detail FROM (
             SELECT row, arg_min(reason, idx) AS reason, arg_min(path || ': ' || detail, idx) AS detail
             FROM img WHERE reason IS NOT NULL GROUP BY row) b
           WHERE meta.row = b.row"""
    )
    if with_sizes:
        con.execute(
            """UPDATE meta SET widths = s.widths, heights = s.heights FROM (
                 SELECT row, list(width ORDER BY idx) AS widths, list(height ORDER BY idx) AS heights
                 FROM img GROUP BY row) s
               WHERE meta.row = s.row AND meta.reason IS NULL"""
        )


def _mark_duplicates(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        """UPDATE meta SET reason = 'duplicate_id', detail = 'id ' || to_json(meta.id)::VARCHAR
             || ' first seen at row ' || d.first_row::VARCHAR
           FROM (SELECT row, min(row) OVER (PARTITION BY id) AS first_row FROM meta
                 WHERE id IN (SELECT id FROM meta GROUP BY id HAVING count(*) > 1)) d
           WHERE meta.row = d.row AND d.first_row <> d.row AND meta.reason IS NULL"""
    )


def _write_outputs(
    con: duckdb.DuckDBPyConnection, spec: DatasetSpec, root: Path, out: Path | None, mode: str, source: dict
) -> None:
    """Catalog and rejected rows, both written to temporary names and only then renamed: a run that
    fails leaves the pair as it was, never half a file nor a catalog beside another run's rejects.
    Both record `source` (the meta file and image store they were made from) for pack's staleness check.

    Sizes were folded into `meta` by UPDATE, so the output is a scan and one sort: no join.
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
            """SELECT $dataset AS dataset, row, id, reason, detail FROM meta
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
) -> DatasetResult:
    """Validate one dataset; writes its catalog and rejected rows. Dataset-level problems go in .error."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    limits = limits or ImageLimits()
    result = DatasetResult(spec.name)
    meta_path = spec.meta_path(root)
    if not meta_path.is_file():
        result.error = f"meta_file_missing: {meta_path}"
        return result
    con = _connect()
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
            """ALTER TABLE meta ADD COLUMN widths INTEGER[];
               ALTER TABLE meta ADD COLUMN heights INTEGER[];
               UPDATE meta SET widths = [], heights = [] WHERE len(images) = 0"""
        )
        _mark_duplicates(con)
        image_dir = spec.image_path(root)
        if image_dir is not None and not image_dir.is_dir():
            result.error = f"image_dir_missing: {image_dir}"
            con.execute(
                """UPDATE meta SET reason = 'image_dir_missing', detail = $dir
                   WHERE reason IS NULL AND len(images) > 0""",
                {"dir": str(image_dir)},
            )
        elif image_dir is not None:
            store = ImageStore(image_dir)
            source["image_store"] = _mark_paths(con, store)
            if mode != "meta":
                _check_headers(con, spec, store, mode == "deep", limits, processes, progress)
            _fold_images_into_samples(con, with_sizes=mode != "meta")
        _write_outputs(con, spec, root, catalog_out, mode, source)
        result.catalog_written = True
        rows = con.execute(
            "SELECT reason, count(*) FROM meta WHERE reason IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
        result.by_reason = {r: n for r, n in rows}
        result.good = result.total - sum(result.by_reason.values())
        return result
    finally:
        con.close()
