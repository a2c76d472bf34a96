"""A packed stage's manifest (`manifest.json`): what was assumed (tokenizer, template, capacity, image
settings) and what every shard holds, built from the shards' stats; the trainer reads nothing else. The
contract is written down in docs/packed-shards.md."""

from __future__ import annotations

from collections import Counter, defaultdict

from ..errors import OvisDataError
from .templates import IGNORE_ID, IMAGE_ID

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


def _manifest_is_current(manifest: dict) -> bool:
    return "vocab_sha256" in manifest.get("tokenizer", {}) and all(
        all(k in st for k in SHARD_KEYS) for st in manifest.get("shards", [])
    )


def _manifest(cfg, recipe, identity, inputs_sha, caption_templates, datasets, shards) -> dict:
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
