"""`ovis-data inspect`: a packed record decoded back into text, supervised spans and images marked."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import OvisDataError
from .shards import Record, read_records
from .templates import IGNORE_ID, IMAGE_ID
from .tokenize import load_tokenizer


def find_record(shard: Path, record: int | str = 0) -> Record:
    """Record number `record` (0-based) of a shard, or the record with that key."""
    shard = Path(shard)
    if not shard.is_file():
        raise OvisDataError(f"{shard}: no such shard")
    for i, rec in enumerate(read_records(shard)):
        if rec.key == str(record) or (isinstance(record, int) and i == record):
            return rec
    raise OvisDataError(f"{shard}: no record {record!r}")


def _tokenizer_for(shard: Path, tokenizer: str | Path | None) -> Any:
    if tokenizer is None:
        manifest = Path(shard).parent / "manifest.json"
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


def render_rich(view: dict) -> Any:
    """The view as rich renderables: supervised text in green, images as magenta markers."""
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
            else:
                text.append(seg["text"], style="bold green" if seg["supervised"] else "dim")
        title = (
            f"sample {i}: {s.get('dataset', '?')} row {s.get('row', '?')} id {s.get('id', '?')} "
            f"({s['length']} ids, {s['supervised_tokens']} supervised)"
        )
        panels.append(Panel(text, title=title, title_align="left"))
    head = Text(
        f"record {view['key']}: {view['input_ids']} ids, {view['tokens']} tokens with images, "
        f"{view['images']} images, {len(view['samples'])} samples  (green: supervised)"
    )
    return Group(head, *panels)
