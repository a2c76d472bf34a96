"""The three stages in miniature: a tiny Ovis trains a few steps on each stage's packed shards.

Not the trainer (DeepSpeed does that at scale): a plain PyTorch loop that follows the real chaining —
stage 1 builds the model from a base LLM and a base ViT (last block re-initialised), each stage trains
the modules its recipe names and saves a self-contained directory the next stage loads. It proves on
one CPU that the shards, the model and the stage hand-offs fit together.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image

from .batching import collate_packed
from .modeling import Ovis
from .tiny import write_tiny_parts
from .trainable import select_trainable


def _records(shards: Iterable[Path], limit: int) -> list[dict]:
    from ovis_data.shards import read_records  # the data engine's reader: one contract for both sides

    out: list[dict] = []
    for shard in shards:
        for rec in read_records(shard):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in rec.images]
            out.append(
                {"input_ids": rec.input_ids, "labels": rec.labels, "lengths": rec.lengths, "images": images}
            )
            if len(out) >= limit:
                return out
    return out


def train_steps(
    model: Ovis, shards: Sequence[Path], trainable: Sequence[str], steps: int, lr: float
) -> list[float]:
    """Losses of `steps` AdamW steps, one packed record per step, only the named modules trained."""
    records = _records(shards, steps)
    if not records:
        raise ValueError(f"no packed records in {[str(s) for s in shards]}")
    select_trainable(model, trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        batch = collate_packed([records[step % len(records)]], model.image_processor, model.num_visual_tokens)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def run_tiny_stages(
    shards_by_stage: dict[int, Sequence[Path]],
    trainable_by_stage: dict[int, Sequence[str]],
    work: Path,
    steps: int = 3,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict[int, list[float]]:
    """Stage 1 from parts, then each later stage from the previous stage's saved directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars drown the demo's own output
    torch.manual_seed(seed)
    llm_dir, vit_dir = write_tiny_parts(work / "parts", seed=seed)
    model = Ovis.from_parts(llm=llm_dir, vit=vit_dir, visual_vocab_size=64, re_init_layers=1)
    losses = {}
    for stage in sorted(shards_by_stage):
        if stage > 1:
            model = Ovis.from_pretrained(work / f"stage{stage - 1}")
        losses[stage] = train_steps(model, shards_by_stage[stage], trainable_by_stage[stage], steps, lr)
        model.save_pretrained(work / f"stage{stage}")
    return losses
