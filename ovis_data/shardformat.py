"""The packed-shard contract: what `ovis-data pack` writes and the trainer reads, defined once.

A packed stage is OUT/stageN/ holding `stageN-NNNNN.tar` shards and `manifest.json`. Each record of a
shard is one packed sequence with the members `<key>.input_ids.npy`, `<key>.labels.npy`,
`<key>.lengths.npy` (int32, 1-D), `<key>.img_NNN.jpg` (in placeholder order) and `<key>.json`
(provenance). The rules both sides apply to a record (its length once every image placeholder becomes
the image's visual tokens, its placeholder count, its supervised targets) live here, next to the names
of the files; `ovis_data.shards` turns records into tar bytes and back. docs/packed-shards.md describes
the format for people.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .constants import IGNORE_ID, IMAGE_ID
from .storage import RemotePath, as_path

FORMAT = "ovis-packed-v1"
MANIFEST = "manifest.json"
# Per shard in the manifest; the per-record lists let a loader plan micro-batches without opening tars.
SHARD_KEYS = (
    "name",
    "records",
    "samples",
    "tokens",
    "input_ids",
    "images",
    "bytes",
    "sha256",
    "record_tokens",  # per record, in order: expanded length (visual_tokens per image)
    "record_supervised",  # per record: supervised targets (labels[1:n] != -100 within each sub-sample)
)
ARRAYS = ("input_ids", "labels", "lengths")  # a record's int32 arrays, one .npy member each, in this order
_SHARD_NAME = re.compile(r"stage(\d+)-(\d+)\.tar")


@dataclass
class Record:
    """One packed sequence: its sub-samples' tokens one after another, their images and provenance."""

    key: str
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    lengths: np.ndarray  # int32, per sub-sample
    images: list[bytes] = field(default_factory=list)  # JPEG, in placeholder order
    meta: dict = field(default_factory=dict)  # {"samples": [{"dataset", "row", "id"}, ...], ...}

    def samples(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each sub-sample's (input_ids, labels), exactly as it was tokenized."""
        start = 0
        for n in self.lengths.tolist():
            yield self.input_ids[start : start + n], self.labels[start : start + n]
            start += n


# -- a record's members ----------------------------------------------------------------------------------
def array_member(key: str, array: str) -> str:
    return f"{key}.{array}.npy"


def image_member(key: str, index: int) -> str:
    return f"{key}.img_{index:03d}.jpg"


def meta_member(key: str) -> str:
    return f"{key}.json"


def split_member(name: str) -> tuple[str, str]:
    """(record key, what follows it) of a member name (keys hold no dot: ShardWriter refuses them)."""
    key, _, rest = name.rsplit("/", 1)[-1].partition(".")
    return key, rest


# -- the rules on a record ---------------------------------------------------------------------------------
def expanded_length(tokens: Any, images: Any, visual_tokens: int) -> Any:
    """Length once each image's one placeholder becomes its `visual_tokens` tokens: what the model computes
    and what packing budgets. Ints or numpy arrays (per sample, per record)."""
    return tokens + (visual_tokens - 1) * images


def placeholder_mismatch(input_ids: Any, images: int, per_image: int = 1) -> str | None:
    """Why `input_ids` (numpy or torch) do not hold `per_image` image placeholders per image (1: as
    packed; the visual tokens per image: expanded), or None when they do."""
    found = int((input_ids == IMAGE_ID).sum())
    if found == images * per_image:
        return None
    if per_image == 1:
        return f"{found} image placeholders but {images} images"
    return f"{found} image placeholders, expected {images} images x {per_image} visual tokens"


def supervised_targets(labels: np.ndarray, lengths: np.ndarray) -> int:
    """Supervised next-token targets of a packed record: labels != -100 except at each sub-sample's first
    position (no token before it in that sub-sample predicts it). Image placeholders carry -100 labels, and
    the visual tokens they expand to are never supervised, so the count is the same expanded or not."""
    mask = np.asarray(labels) != IGNORE_ID
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))[np.asarray(lengths) > 0]
    mask[starts] = False
    return int(mask.sum())


# -- shards and the manifest -----------------------------------------------------------------------------
def shard_name(stage: int, index: int) -> str:
    return f"stage{stage}-{index:05d}.tar"


def shard_index(name: str) -> int:
    """The shard number in a name `shard_name` made."""
    m = _SHARD_NAME.fullmatch(name.rsplit("/", 1)[-1])
    if m is None:
        raise ValueError(f"{name!r} is not a packed shard's name (stageN-NNNNN.tar)")
    return int(m.group(2))


def manifest_is_current(manifest: dict) -> bool:
    """Whether a manifest has every key this version writes (an older one is rewritten by pack)."""
    return "vocab_sha256" in manifest.get("tokenizer", {}) and all(
        all(k in st for k in SHARD_KEYS) for st in manifest.get("shards", [])
    )


def read_manifest(data_dir: str | os.PathLike | RemotePath) -> tuple[dict, Path | RemotePath]:
    """The stage's manifest (and its path); a clear error when the folder or manifest is missing."""
    data_dir = as_path(data_dir)  # a local folder, or a URL such as s3://bucket/packed/stage3
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"{data_dir}: no such data directory (expected OUT/stageN from ovis-data pack)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (is {data_dir} a stage packed by ovis-data pack?)")
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


class ShardError(Exception):
    """A packed shard that cannot be read as its manifest describes: names the shard and the record."""

    def __init__(self, shard: Path | str, record: int | None, reason: str):
        self.shard, self.record, self.reason = str(shard), record, reason
        where = f"{self.shard}: record {record}" if record is not None else self.shard
        super().__init__(f"{where}: {reason}")
