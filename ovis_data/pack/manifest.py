"""A packed stage's manifest (`shardformat.MANIFEST`): what was assumed (tokenizer, template, capacity,
image settings) and what every shard holds, built from the shards' stats; the trainer reads nothing else.
The contract is written down in docs/packed-shards.md."""

from __future__ import annotations

from collections import Counter, defaultdict
from enum import IntEnum

from ..constants import IGNORE_ID, IMAGE_ID
from ..errors import OvisDataError
from ..shardformat import FORMAT, SHARD_KEYS


class DropReason(IntEnum):
    """Why a selected sample was not packed, as the manifest counts it (`label`). The first five are
    decided from the tokenized samples before packing (the int8 code per sample, 0 = kept; where several
    apply, the lowest code wins); IMAGE_UNREADABLE and DECOMPRESSION_BOMB when its shard is written."""

    KEPT = 0
    TEMPLATE_ERROR = 1  # the chat/caption template refused the sample
    IMAGE_MISMATCH = 2  # <image> marks in the text and image paths differ in number
    NO_LABEL = 3  # nothing supervised
    TOO_LONG = 4  # longer than a packed sequence once its images are expanded
    TOO_MANY_IMAGES = 5  # more images than one packed sequence may hold
    IMAGE_UNREADABLE = 6  # gone or broken since validation
    DECOMPRESSION_BOMB = 7  # over Pillow's pixel limit (a catalog validated with --meta-only)

    @property
    def label(self) -> str:
        return self.name.lower()


def build_manifest(cfg, recipe, identity, inputs_sha, caption_templates, datasets, shards) -> dict:
    """Per dataset (sorted by name): catalog, kept, weight, selected = packed + dropped (by reason)."""
    packed: Counter = Counter()
    late: dict[str, Counter] = defaultdict(Counter)
    for st in shards:
        packed.update(st["datasets"])
        for name, reasons in st["dropped"].items():
            late[name].update(reasons)
    dropped: Counter = Counter()
    datasets = dict(sorted(datasets.items()))
    for name, d in datasets.items():
        d["dropped"] = dict(sorted((Counter(d["dropped"]) + late[name]).items()))
        d["packed"] = int(packed.get(name, 0))
        dropped.update(d["dropped"])
        if d["packed"] + sum(d["dropped"].values()) != d["selected"]:  # a sample lost without a reason
            raise OvisDataError(
                f"{name}: {d['selected']} selected but {d['packed']} packed and "
                f"{sum(d['dropped'].values())} dropped: please report this"
            )
    records = sum(st["records"] for st in shards)
    tokens = sum(st["tokens"] for st in shards)
    return {
        "format": FORMAT,
        "stage": cfg.stage,
        "recipe": str(recipe.path.name),
        "tokenizer": {
            "name": identity["name"],
            "sha256": identity["sha256"],
            "vocab_sha256": identity["vocab_sha256"],
            "path": cfg.tokenizer_path,
        },
        "template": {"chat": cfg.chat_format, "captions": caption_templates},
        "capacity": cfg.capacity,
        "visual_tokens_per_image": cfg.visual_tokens,
        "image_size": cfg.image_size,
        "max_images_per_pack": cfg.max_images,
        "image_token_id": IMAGE_ID,
        "ignore_id": IGNORE_ID,
        "seed": cfg.seed,
        "inputs_sha256": inputs_sha,
        "shards": [{k: st[k] for k in SHARD_KEYS} for st in shards],
        "datasets": datasets,
        "dropped": dict(sorted(dropped.items())),
        "records": records,
        "samples": sum(st["samples"] for st in shards),
        "tokens": tokens,
        "fill": tokens / (records * cfg.capacity) if records else 0.0,
    }
