"""Archives into a staging folder: zip, tar (plain, gz, bz2, xz), split archives (parts read as one
stream, never joined on disk), parquet files of image bytes, single files.

Each member's path has `strip` removed (members outside it are skipped), must match an `include` glob
when some are given, gets `into` prepended, and is then checked: a member that would land outside
image_dir (absolute, `..`, a link pointing out) or is a device/fifo is refused and named, and the source
fails with nothing of it placed. Output bytes are counted against the archive's size: past the
expansion-ratio limit (a zip bomb) extraction stops.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import stat
import string
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import BinaryIO

from ..sources import SourceFile
from .download import SourceFailed
from .spanned import is_spanned, spanned_members

MAX_RATIO = 100.0  # output bytes per archive byte; images barely compress, bombs reach thousands
RATIO_SLACK = 8 << 20  # small archives of text may expand more: this much is always allowed
COPY_CHUNK = 1 << 20


class ConcatReader(io.RawIOBase):
    """Several files read as one seekable stream: a split archive's parts in order."""

    def __init__(self, paths: list[Path]):
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 (closed in close())
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = 0
        view = memoryview(b).cast("B")
        while n < len(view) and self._pos < self._size:
            i = max(j for j, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            got = f.readinto(view[n : n + min(len(view) - n, self._starts[i] + self._sizes[i] - self._pos)])
            if not got:
                break
            n += got
            self._pos += got
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


@dataclass
class Member:
    name: str  # as in the archive
    kind: str  # file, dir, symlink, hardlink, special
    size: int = 0
    target: str = ""  # links: where they point (a hardlink: another member's name)
    open: Callable[[], BinaryIO] | None = None


@dataclass
class Extracted:
    files: int = 0
    bytes: int = 0
    skipped: int = 0


def _zip_members(stream: BinaryIO) -> Iterator[Member]:
    with zipfile.ZipFile(stream) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            if info.is_dir():
                yield Member(info.filename, "dir")
            elif stat.S_ISLNK(mode):
                yield Member(info.filename, "symlink", target=zf.read(info).decode("utf-8", "replace"))
            elif mode and not stat.S_ISREG(mode) and stat.S_IFMT(mode):
                yield Member(info.filename, "special")
            else:
                yield Member(info.filename, "file", info.file_size, open=lambda i=info: zf.open(i))


def _tar_members(stream: BinaryIO) -> Iterator[Member]:
    with tarfile.open(fileobj=stream, mode="r|*") as tf:  # streaming: one pass, any compression
        for ti in tf:
            if ti.isdir():
                yield Member(ti.name, "dir")
            elif ti.issym():
                yield Member(ti.name, "symlink", target=ti.linkname)
            elif ti.islnk():
                yield Member(ti.name, "hardlink", target=ti.linkname)
            elif ti.isreg():
                yield Member(ti.name, "file", ti.size, open=lambda t=ti: tf.extractfile(t))  # type: ignore[misc]
            else:
                yield Member(ti.name, "special")


def _parquet_members(stream: BinaryIO, sf: SourceFile, label: str) -> Iterator[Member]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(stream)
    names = set(pf.schema_arrow.names)
    if sf.image_column not in names:
        raise SourceFailed(f"{label}: no column {sf.image_column!r} (columns: {sorted(names)})")
    fields = []
    if sf.name_template is not None:
        fields = [f for _, f, _, _ in string.Formatter().parse(sf.name_template) if f and f != "row"]
    elif sf.name_column is not None:
        fields = [sf.name_column]
    missing = [f for f in fields if f not in names]
    if missing:
        raise SourceFailed(f"{label}: no column(s) {missing} for the image names (columns: {sorted(names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=256, columns=[sf.image_column, *dict.fromkeys(fields)]):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            cell = cols[sf.image_column][i]
            data, struct_path = (
                (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
            )
            if sf.name_template is not None:
                name = sf.name_template.format(row=row, **{f: cols[f][i] for f in fields})
            elif sf.name_column is not None:
                name = cols[sf.name_column][i]
            else:
                name = struct_path
            row += 1
            if not name or data is None:
                raise SourceFailed(f"{label}: row {row - 1} has no image name or no image bytes")
            yield Member(str(name), "file", len(data), open=lambda d=data: io.BytesIO(d))


def members(fmt: str, stream: BinaryIO, sf: SourceFile, label: str, name: str) -> Iterator[Member]:
    try:
        if fmt == "zip" and is_spanned(stream):
            for name, is_dir, reader in spanned_members(stream, label):
                yield Member(name, "dir") if is_dir else Member(name, "file", open=lambda r=reader: r)  # type: ignore[misc]
        elif fmt == "zip":
            yield from _zip_members(stream)
        elif fmt == "tar":
            yield from _tar_members(stream)
        elif fmt == "parquet":
            yield from _parquet_members(stream, sf, label)
        else:
            yield Member(name, "file", open=lambda: stream)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise SourceFailed(f"{label}: not a readable {fmt} archive, or a damaged one ({e})") from e


def _unsafe(rel: str) -> str | None:
    if not rel or rel.startswith("/") or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        return "absolute path"
    if "\x00" in rel:
        return "NUL byte in name"
    if ".." in rel.split("/"):
        return "'..' segment"
    return None


def map_name(name: str, sf: SourceFile) -> str | None:
    """Where a member lands, relative to image_dir; None when strip/include leave it out."""
    rel = name.replace("\\", "/") if not name.startswith("/") else name
    while rel.startswith("./"):
        rel = rel[2:]
    if sf.strip:
        if not rel.startswith(sf.strip):
            return None
        rel = rel[len(sf.strip) :]
    if not rel or rel.endswith("/"):
        return None
    if sf.include and not any(fnmatch(rel, g) for g in sf.include):
        return None
    if sf.flatten:
        rel = rel.rsplit("/", 1)[-1]
    return sf.into + rel


def extract(
    parts: list[Path],
    sf: SourceFile,
    staging: Path,
    label: str,
    on_file: Callable[[int], None] | None = None,
    max_ratio: float = MAX_RATIO,
) -> Extracted:
    """Everything of one (possibly split) archive into `staging` (which must be empty), checked."""
    first = sf.path or (sf.parts[0] if sf.parts else None) or sf.url or parts[0].name
    fmt = sf.file_format(posixpath.basename(first))
    archive_bytes = sum(p.stat().st_size for p in parts)
    limit = archive_bytes * max_ratio + RATIO_SLACK
    # a split archive's parts read as one stream; closed in the finally below
    stream: BinaryIO = (
        io.BufferedReader(ConcatReader(parts), 1 << 20) if len(parts) > 1 else open(parts[0], "rb")  # noqa: SIM115
    )
    out = Extracted()
    refused: list[str] = []
    placed: dict[str, str] = {}  # member name -> staged relative path (hardlinks copy from it)
    real_staging = os.path.realpath(staging)
    try:
        for m in members(fmt, stream, sf, label, posixpath.basename(first)):
            if m.kind == "dir":
                continue
            rel = map_name(m.name, sf)
            if rel is None:
                out.skipped += 1
                continue
            why = _unsafe(rel)
            if why is None and m.kind == "special":
                why = "a device, fifo or socket"
            if why is None and m.kind == "symlink":
                aim = posixpath.normpath(posixpath.join(posixpath.dirname(rel), m.target))
                if m.target.startswith("/") or aim == ".." or aim.startswith("../"):
                    why = f"a link pointing out of image_dir ({m.target})"
            if why is None and m.kind == "hardlink" and m.target not in placed:
                why = f"a hard link to {m.target!r}, which is not extracted from this archive"
            if why is not None:
                refused.append(f"{m.name!r} ({why})")
                continue
            dest = staging / rel
            if not os.path.realpath(dest.parent).startswith(real_staging):  # a link in the path itself
                refused.append(f"{m.name!r} (its folder is a link pointing out of image_dir)")
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            if m.kind == "symlink":
                os.symlink(m.target, dest)
            elif m.kind == "hardlink":
                shutil.copyfile(staging / placed[m.target], dest)
                out.bytes += dest.stat().st_size
            else:
                assert m.open is not None
                src = m.open()
                with open(dest, "wb") as f:
                    while block := src.read(COPY_CHUNK):
                        out.bytes += len(block)
                        if out.bytes > limit:
                            raise SourceFailed(
                                f"{label}: expands past {max_ratio:g}x its {archive_bytes:,} bytes "
                                f"(at {m.name!r}): stopped, nothing placed (a zip bomb?)"
                            )
                        f.write(block)
            placed[m.name] = rel
            out.files += 1
            if on_file is not None:
                on_file(out.files)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise SourceFailed(f"{label}: damaged archive ({e})") from e
    finally:
        stream.close()
    if refused:
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise SourceFailed(f"{label}: refused {', '.join(refused[:8])}{more}: nothing of it placed")
    return out
