"""Every shard the manifest lists is there at its size before any compute (and, asked, at its hash).

A missing or truncated shard was found only when the loader reached it, hours into a run, as a traceback
from a worker. The manifest gives each shard's `bytes` and `sha256`; a size check costs a stat per shard,
a hash check reads the data once (`ovis-train --verify-data`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ovis_data.storage import AnyPath


class DataCheckError(ValueError):
    """A shard missing, or not the size (hash) its manifest says."""


def _sha256(path: AnyPath) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_shards(
    data_dir: AnyPath,
    manifest: dict,
    manifest_path: Any,
    hashes: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Raise DataCheckError naming the first shard that is missing or differs from `manifest`."""
    shards = manifest.get("shards", [])
    for st in shards:
        path = data_dir / st["name"]
        if not path.is_file():
            raise DataCheckError(
                f"{path}: shard listed in {manifest_path} is missing ({len(shards)} shards listed)"
            )
        size = path.stat().st_size
        if "bytes" in st and size != st["bytes"]:
            raise DataCheckError(
                f"{path}: {size:,} bytes, {manifest_path} says {st['bytes']:,} (truncated or replaced): "
                "copy the stage again or re-pack it"
            )
    if not hashes:
        return
    listed = [st for st in shards if st.get("sha256")]
    if len(listed) < len(shards):
        raise DataCheckError(f"{manifest_path}: no sha256 for some shards: re-pack to verify them")
    with ThreadPoolExecutor(4) as pool:  # hashlib releases the GIL
        for done, (st, digest) in enumerate(
            zip(listed, pool.map(lambda st: _sha256(data_dir / st["name"]), listed), strict=True), 1
        ):
            if digest != st["sha256"]:
                raise DataCheckError(
                    f"{data_dir / st['name']}: sha256 differs from {manifest_path} (damaged or replaced): "
                    "copy the stage again or re-pack it"
                )
            if progress:
                progress(done, len(listed))
