"""From packed records (the pack stage's output) to the model's inputs.

A packed record: `input_ids` int32 [L] (sub-samples one after another, one -200 per image), `labels` int32
[L] (-100 where unsupervised), `lengths` int32 [n_sub] (summing to L), `images` (PIL images or `[h, w, 3]`
uint8 RGB arrays, placeholder order).

`collate_packed` expands each image's placeholder to `num_visual_tokens` placeholders (labels -100), lays
the records out in rows (`layout="rows"`: one record per row, right-padded; `"concat"`: all records in one
row, no padding, the natural input of varlen flash / flex attention), and describes the packing with
`segment_ids`, `position_ids` (restarting at each sub-sample) and `cu_seqlens` over the flattened batch.

Loss normalisation: `n_supervised` is the number of (shifted, in-sub-sample) targets of the batch, known
before the forward. Sum it over the micro-batches of an optimizer step and over ranks, then
`loss = out.loss_sum / global_count` (times the factor your gradient averaging divides by: world size
under DeepSpeed data parallelism, and the accumulation steps if `engine.backward` scales by them): each
token then weighs the same whatever the packing, unlike an average of per-micro-batch means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ovis_data.shardformat import expanded_length, placeholder_mismatch, supervised_targets

from .attention import cu_seqlens_from_lengths
from .constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from .preprocess import OvisImageProcessor


def expand_image_placeholders(
    input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, num_visual_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Repeat each -200 `num_visual_tokens` times (labels -100 there); lengths grow to match.

    A sub-sample's expanded length = tokens - n_images + n_images * num_visual_tokens.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {input_ids.shape} and labels {labels.shape} differ in shape")
    if int(lengths.sum()) != len(input_ids):
        raise ValueError(f"lengths sum to {int(lengths.sum())}, input_ids has {len(input_ids)} tokens")
    is_image = input_ids == IMAGE_TOKEN_ID
    repeats = np.where(is_image, num_visual_tokens, 1)
    ids = np.repeat(input_ids, repeats)
    labs = np.repeat(np.where(is_image, IGNORE_INDEX, labels), repeats)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    images_per_sub = np.add.reduceat(is_image.astype(np.int64), starts) if len(lengths) else lengths
    new_lengths = expanded_length(lengths, images_per_sub, num_visual_tokens)
    return ids, labs, new_lengths


def count_targets(labels: np.ndarray, lengths: np.ndarray) -> int:
    """Supervised targets after the shift: label t+1 of the same sub-sample is not -100 (the rule pack
    also counts per record into the manifest: one definition, in ovis_data.shardformat)."""
    return supervised_targets(labels, lengths)


def _field(record: Mapping[str, Any] | Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def collate_packed(
    records: Sequence[Mapping[str, Any]],
    image_processor: OvisImageProcessor,
    num_visual_tokens: int,
    layout: str = "rows",
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    pixels: str = "normalized",
) -> dict[str, Any]:
    """Model inputs for a list of packed records (mappings or objects with the four fields).

    Returns a dict with `input_ids`, `labels`, `position_ids`, `segment_ids` (all int64 `[B, L]`),
    `cu_seqlens` (int32, over the flattened batch, padding as its own segment), `max_seqlen` (int),
    `pixel_values` (`[n_images, 3, S, S]` float32, or None) and `n_supervised` (int). Pass everything but
    `n_supervised` to `Ovis.forward` (`model(**batch)` ignores it).

    `pixels="canvas"`: `pixel_values` are the uint8 canvases of `OvisImageProcessor.canvas` (`[n, S, S, 3]`)
    and `image_sizes` is added; `batch_to(..., image_processor=...)` normalises them on the device.
    """
    if layout not in ("rows", "concat"):
        raise ValueError(f"layout must be 'rows' or 'concat', got {layout!r}")
    if pixels not in ("normalized", "canvas"):
        raise ValueError(f"pixels must be 'normalized' or 'canvas', got {pixels!r}")
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    images: list[Image.Image | np.ndarray] = []
    n_supervised = 0
    for i, record in enumerate(records):
        ids, labels, lengths = (np.asarray(_field(record, k)) for k in ("input_ids", "labels", "lengths"))
        record_images = list(_field(record, "images") or [])
        mismatch = placeholder_mismatch(ids, len(record_images))
        if mismatch is not None:
            raise ValueError(f"record {i}: {mismatch}")
        ids, labels, lengths = expand_image_placeholders(ids, labels, lengths, num_visual_tokens)
        n_supervised += count_targets(labels, lengths)
        rows.append((ids, labels, lengths))
        images.extend(record_images)
    if layout == "concat" and rows:
        rows = [tuple(np.concatenate(parts) for parts in zip(*rows, strict=True))]  # type: ignore[list-item]

    width = max(len(ids) for ids, _, _ in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels_t = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.zeros((batch, width), dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    flat_lengths: list[int] = []
    for b, (ids, labels, lengths) in enumerate(rows):
        seg_lengths = [int(n) for n in lengths if n > 0]
        if width > len(ids):  # padding is one more segment: causal among itself, invisible to the rest
            seg_lengths.append(width - len(ids))
        flat_lengths.extend(seg_lengths)
        input_ids[b, : len(ids)] = torch.from_numpy(ids)
        labels_t[b, : len(ids)] = torch.from_numpy(labels)
        seg = torch.repeat_interleave(torch.arange(len(seg_lengths)), torch.tensor(seg_lengths))
        segment_ids[b] = seg
        starts = torch.cumsum(torch.tensor(seg_lengths), 0) - torch.tensor(seg_lengths)
        position_ids[b] = torch.arange(width) - starts[seg]
    extra: dict[str, Any] = {}
    if not images:
        pixel_values = None
    elif pixels == "canvas":
        pixel_values, extra["image_sizes"] = image_processor.canvas(images)
    else:
        pixel_values = image_processor(images)
    return {
        **extra,
        "input_ids": input_ids,
        "labels": labels_t,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "cu_seqlens": cu_seqlens_from_lengths(flat_lengths),
        "max_seqlen": max(flat_lengths),
        "pixel_values": pixel_values,
        "n_supervised": n_supervised,
    }


def batch_to(
    batch: Mapping[str, Any],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    image_processor: OvisImageProcessor | None = None,
) -> dict:
    """Move the tensors of a collated batch to `device` (pixel values also to `dtype`); uint8 canvases
    (`pixels="canvas"`) are normalised there by `image_processor`, and `image_sizes` dropped."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            cast = dtype if key == "pixel_values" and dtype and value.is_floating_point() else None
            value = value.to(device, dtype=cast, non_blocking=True)
        out[key] = value
    sizes = out.pop("image_sizes", None)
    if sizes is not None:
        if image_processor is None:
            raise ValueError("the batch holds uint8 image canvases: pass the model's image_processor")
        values = image_processor.normalize_canvas(out["pixel_values"], sizes)
        out["pixel_values"] = values.to(dtype) if dtype else values
    return out
