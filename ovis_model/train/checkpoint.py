"""Checkpoints (DeepSpeed's, with the loader's position inside) and the stage's final model directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

TAG_PREFIX = "step"


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> Path:
    """A DeepSpeed checkpoint `ckpt_dir/stepN` (every rank writes its shard), then the oldest beyond `keep`
    removed. DeepSpeed writes the `latest` file last, so a run killed mid-save resumes from the one before."""
    tag = f"{TAG_PREFIX}{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    _barrier()
    if _is_main() and keep > 0:
        for old in sorted(_tags(ckpt_dir))[:-keep]:
            shutil.rmtree(ckpt_dir / f"{TAG_PREFIX}{old}", ignore_errors=True)
    _barrier()
    return ckpt_dir / tag


def _tags(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return [
        int(p.name[len(TAG_PREFIX) :])
        for p in ckpt_dir.iterdir()
        if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name[len(TAG_PREFIX) :].isdigit()
    ]


def latest(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed last completed (its `latest` file), or None."""
    marker = ckpt_dir / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def load(engine: Any, ckpt_dir: Path) -> dict:
    """Restore model, optimizer, scheduler and return the client state (the loader's position, the step)."""
    tag = latest(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to resume from (no 'latest' file)")
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    return client_state


def export_model(engine: Any, out: Path, zero_stage: int) -> None:
    """A self-contained model directory (config, safetensors, tokenizer, image processor) from the engine:
    under ZeRO-3 the partitioned parameters are gathered first (every rank takes part)."""
    model = engine.module
    state_dict = None
    if zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # the parameters' own dtype, gathered
    if _is_main():
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    _barrier()
