"""Checkpoints (DeepSpeed's, with the loader's position inside, and a manifest written last) and the
stage's final model directory (written beside and renamed into place)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import ckpt_manifest
from .diskfull import tree_bytes, writing

TAG_PREFIX = "step"


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> Path:
    """A DeepSpeed checkpoint `ckpt_dir/stepN` (every rank writes its shard), then its manifest (rank 0,
    last: present means complete), then the oldest beyond `keep` removed. A full disk is one line naming
    the folder and the space needed; the incomplete checkpoint is removed (it could never be resumed)."""
    tag = f"{TAG_PREFIX}{step}"
    newest = tags(ckpt_dir)
    needed = tree_bytes(ckpt_dir / f"{TAG_PREFIX}{newest[-1]}") if newest else _estimate_bytes(engine)
    try:
        with writing(ckpt_dir, f"checkpoint {tag}", needed):
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
            _barrier()
            if _is_main():
                ckpt_manifest.write(ckpt_dir / tag, step)
    except BaseException:
        if _is_main():
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        raise
    _barrier()
    if _is_main() and keep > 0:
        for old in tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / f"{TAG_PREFIX}{old}", ignore_errors=True)
    _barrier()
    return ckpt_dir / tag


def _estimate_bytes(engine: Any) -> int:
    """The first checkpoint's size, roughly: every parameter, and for the trained ones fp32 master weights
    and Adam's two moments (12 bytes each)."""
    total = 0
    for p in engine.module.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n * p.element_size() + (12 * n if p.requires_grad else 0)
    return total


def tags(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoint folders in `ckpt_dir`, oldest first (complete or not)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        int(p.name[len(TAG_PREFIX) :])
        for p in ckpt_dir.iterdir()
        if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name[len(TAG_PREFIX) :].isdigit()
    )


def latest(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed last completed (its `latest` file), or None."""
    marker = ckpt_dir / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def choose(ckpt_dir: Path, say: Callable[[str], None]) -> tuple[int | None, list[str]]:
    """The newest checkpoint whose files match its manifest (its step, or None) and, for every newer one
    passed over, why (also said through `say`)."""
    passed: list[str] = []
    for step in reversed(tags(ckpt_dir)):
        why = ckpt_manifest.problem(ckpt_dir / f"{TAG_PREFIX}{step}")
        if why is None:
            return step, passed
        passed.append(f"{TAG_PREFIX}{step}: {why}")
        say(f"  checkpoint {ckpt_dir / f'{TAG_PREFIX}{step}'} cannot be resumed from: {why}")
    return None, passed


def load(engine: Any, ckpt_dir: Path, step: int) -> dict:
    """Restore model, optimizer and scheduler from checkpoint `step` (every file loaded weights-only: a
    file that holds code is refused, safe_load.UnsafeCheckpointError) and return the client state. A ZeRO
    checkpoint written by another number of ranks is re-partitioned (elastic.load_on_new_size)."""
    from .elastic import load_on_new_size, saved_ranks
    from .safe_load import make_weights_only

    make_weights_only(engine)
    tag = f"{TAG_PREFIX}{step}"
    files = saved_ranks(ckpt_dir / tag)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if files and len(files) != world:
        return load_on_new_size(engine, ckpt_dir, tag, files)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    return client_state


def publish_dir(out: Path, write: Callable[[Path], None]) -> None:
    """`write(folder)` into `out.partial`, then renamed to `out`: a kill while writing leaves the previous
    `out` whole (and a `.partial` that the next export replaces). The old folder is renamed aside before
    the new one takes its name, and removed after."""
    partial, old = out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)


def export_model(engine: Any, out: Path, zero_stage: int) -> None:
    """A self-contained model directory (config, safetensors, tokenizer, image processor) from the engine:
    under ZeRO-3 the partitioned parameters are gathered first (every rank takes part)."""
    model = engine.module
    state_dict = None
    if zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # the parameters' own dtype, gathered
    if _is_main():
        needed = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in model.parameters())
        with writing(out.parent, "the model", needed):
            publish_dir(
                out, lambda tmp: model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            )
    _barrier()
