"""`ovis-data inspect`: a packed record decoded back into text, supervised spans and images marked."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import OvisDataError
from ..shardformat import MANIFEST, Record, ShardError
from ..shards import read_records
from .templates import IGNORE_ID, IMAGE_ID
from .tokenize import load_tokenizer


def find_record(shard: Path, record: int | str = 0) -> Record:
    """Record number `record` (0-based) of a shard, or the record with that key."""
    shard = Path(shard)
    if shard.is_dir():
        tars = sorted(shard.glob("*.tar")) or sorted(shard.glob("*/*.tar"))
        hint = f", e.g. {tars[0]}" if tars else " (pack writes OUT/stageN/stageN-NNNNN.tar)"
        raise OvisDataError(f"{shard} is a folder: name one shard in it{hint}")
    if not shard.is_file():
        raise OvisDataError(f"{shard}: no such file")
    if not tarfile.is_tarfile(shard):
        raise OvisDataError(f"{shard}: not a packed shard (not a tar file; pack writes OUT/stageN/*.tar)")
    try:
        for i, rec in enumerate(read_records(shard)):
            if rec.key == str(record) or (isinstance(record, int) and i == record):
                if rec.input_ids.size == 0:
                    raise OvisDataError(
                        f"{shard}: record {rec.key!r} has no tokens ({rec.key}.input_ids.npy): not a record "
                        "written by ovis-data pack"
                    )
                return rec
    except ShardError as e:
        raise OvisDataError(f"not a readable packed shard: {e}") from e
    raise OvisDataError(f"{shard}: no record {record!r}")


def _tokenizer_for(shard: Path, tokenizer: str | Path | None) -> Any:
    if tokenizer is None:
        manifest = Path(shard).parent / MANIFEST
        if not manifest.exists():
            raise OvisDataError(f"{manifest} not found: pass --tokenizer")
        tokenizer = json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]["path"]
    return load_tokenizer(tokenizer)


def segments(tok: Any, ids: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Runs of text with one supervision state, and images: [{"text", "supervised"} | {"image": k}]."""
    out: list[dict] = []
    image = 0
    run: list[int] = []
    state = None

    def flush() -> None:
        if run:
            out.append({"text": tok.decode(run, skip_special_tokens=False), "supervised": bool(state)})
            run.clear()

    for t, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        if t == IMAGE_ID:
            flush()
            out.append({"image": image})
            image += 1
            continue
        sup = lab != IGNORE_ID
        if sup != state:
            flush()
            state = sup
        run.append(t)
    flush()
    return out


def describe_record(rec: Record, tok: Any) -> dict:
    """A JSON-able view: each sub-sample with its provenance, length, images and text segments."""
    sizes = [Image.open(io.BytesIO(b)).size for b in rec.images]
    samples, image = [], 0
    provenance = rec.meta.get("samples", [])
    for k, (ids, labels) in enumerate(rec.samples()):
        segs = segments(tok, ids, labels)
        for s in segs:
            if "image" in s:
                s["image"] = image
                s["size"] = list(sizes[image]) if image < len(sizes) else None
                image += 1
        samples.append(
            {
                **(provenance[k] if k < len(provenance) else {}),
                "length": len(ids),
                "supervised_tokens": int((labels != IGNORE_ID).sum()),
                "segments": segs,
            }
        )
    return {
        "key": rec.key,
        "input_ids": len(rec.input_ids),
        "tokens": rec.meta.get("tokens"),
        "images": len(rec.images),
        "samples": samples,
    }


def inspect_record(shard: Path, record: int | str = 0, tokenizer: str | Path | None = None) -> dict:
    return describe_record(find_record(shard, record), _tokenizer_for(shard, tokenizer))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def render_rich(view: dict, plain: bool = False) -> Any:
    """The view as rich renderables: supervised text in green, images as magenta markers. `plain` (no
    colour: piped output, NO_COLOR) marks supervised text as [[...]] instead, so it still shows."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    panels = []
    for i, s in enumerate(view["samples"]):
        text = Text()
        for seg in s["segments"]:
            if "image" in seg:
                size = "x".join(map(str, seg["size"])) if seg.get("size") else "?"
                text.append(f"[IMAGE {seg['image']} {size}]", style="bold magenta")
            elif seg["supervised"] and plain:
                text.append(f"[[{seg['text']}]]")
            else:
                text.append(seg["text"], style="bold green" if seg["supervised"] else "dim")
        # provenance inside the panel, where it wraps, not in its title, where it would be cut
        title = Text(
            f"sample {i}: {s.get('dataset', '?')} row {s.get('row', '?')} id {s.get('id', '?')} "
            f"({s['length']} ids, {s['supervised_tokens']} supervised)",
            style="bold",
        )
        panels.append(Panel(Group(title, text)))
    legend = "supervised text in [[...]]" if plain else "green: supervised"
    head = Text(
        f"record {view['key']}: {view['input_ids']} ids, {view['tokens']} tokens with images, "
        f"{_count(view['images'], 'image')}, {_count(len(view['samples']), 'sample')}  ({legend})"
    )
    return Group(head, *panels)
