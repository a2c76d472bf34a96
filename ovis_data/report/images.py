"""The few images a report shows or measures: read from either image layout, made into small JPEG
thumbnails as data: URIs. A local shards store's index is scanned by DuckDB for just those paths, never
loaded whole (10M images)."""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass

import duckdb
import pyarrow as pa
from PIL import Image

from ..imagestore import ImageStore, index_file, unsafe_path_reason
from ..storage import AnyPath
from ..validate.imagecheck import DEFAULT_MAX_PIXELS
from .stats import sql_path

THUMB_SIDE = 192  # px, the longer side of a thumbnail
THUMB_QUALITY = 70


@dataclass
class Picture:
    """One image of a sample as the page shows it: a thumbnail, or why there is none."""

    path: str
    uri: str | None = None  # data:image/jpeg;base64,...
    size: tuple[int, int] | None = None  # the original's width and height
    note: str = ""


def read_images(con: duckdb.DuckDBPyConnection, image_dir: AnyPath, paths: list[str]) -> dict[str, bytes]:
    """The bytes of those `paths` that can be read (unsafe or absent ones are left out)."""
    safe = sorted({p for p in paths if p and unsafe_path_reason(p) is None})
    store = ImageStore(image_dir)
    found: dict[str, bytes] = {}
    index = index_file(store.image_dir) if store.layout == "shards" else None
    if index is not None:
        con.register("report_paths", pa.table({"image_path": pa.array(safe, pa.string())}))
        try:
            rows = con.execute(
                f"""SELECT DISTINCT ON (x.image_path) x.image_path, x.tar, x."offset", x.size
                    FROM read_parquet({sql_path(index)}) x JOIN report_paths p USING (image_path)
                    ORDER BY x.image_path"""
            ).fetchall()
        finally:
            con.unregister("report_paths")
        for path, tar, offset, size in rows:
            with open(store.image_dir / tar, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            if len(data) == size:
                found[path] = data
        return found
    for p in safe:
        try:
            found[p] = store.read_bytes(p)
        except (OSError, PermissionError, KeyError):
            continue
    store.close()
    return found


def _open(data: bytes) -> Image.Image:
    """PIL's lazy open (header only); its decompression-bomb warning is not for us: callers check sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header, or None when it is not an image."""
    try:
        with _open(data) as img:
            return img.size
    except Exception:  # PIL raises many kinds for bytes that are not an image
        return None


def picture(path: str, data: bytes | None) -> Picture:
    """A thumbnail of one image: decoded at a reduced size where the format allows (JPEG draft mode),
    never when its header claims more pixels than validate accepts."""
    if data is None:
        reason = unsafe_path_reason(path)
        return Picture(path, note=f"not opened: {reason}" if reason else "no such file")
    try:
        with _open(data) as img:
            size = img.size
            if size[0] * size[1] > DEFAULT_MAX_PIXELS:
                return Picture(path, size=size, note="not shown: over the pixel limit")
            img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
            small = img.convert("RGB")
    except Exception as e:  # a truncated or foreign file: say so on the card
        return Picture(path, note=f"cannot be decoded ({type(e).__name__})")
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=False)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Picture(path, uri, size)
