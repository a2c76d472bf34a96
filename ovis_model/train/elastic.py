"""Model and optimizer state onto another number of ranks (elastic resume), ZeRO stages 0, 1 and 2.

DeepSpeed refuses to load a ZeRO checkpoint's optimizer state on another data-parallel size ("Automatic
adjustment of ZeRO's optimizer state partitioning with a new world size is not currently supported"); its
answer is the universal checkpoint (`ds_to_universal`, then `checkpoint.load_universal`), which converts
the whole checkpoint into one folder per parameter and loads those files with pickle's full power. Here
the state is small enough to re-partition in place, and it keeps the trainer's rule that resuming loads
every file weights-only (safe_load): the module and the LR schedule come through DeepSpeed as usual
(without optimizer states), then each saved rank's flat partitions (fp32 master weights, Adam's moments)
are joined, their padding removed, and cut again into this world's partitions.

- ZeRO-0: the optimizer state is whole in the model-states file; DeepSpeed loads it on any world size.
- ZeRO-1/2: re-partitioned as above.
- ZeRO-3: refused (one line, before the model loads: check_zero3_world): its parameters are partitioned
  too, and DeepSpeed 0.16+ supports that only through universal checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import TAG_PREFIX, tags
from .safe_load import load_weights_only

_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


class ElasticError(ValueError):
    """A checkpoint that cannot move to this world size: one line saying why and what to do."""


def saved_ranks(tag_dir: Path) -> list[Path]:
    """A ZeRO checkpoint's optimizer files, one per saved rank in rank order (none under ZeRO-0)."""
    found = {int(m.group(1)): p for p in tag_dir.iterdir() if (m := _OPTIM_FILE.fullmatch(p.name))}
    return [found[r] for r in sorted(found)]


def _zero3_refusal(tag_dir: Path, saved: int, world: int) -> ElasticError:
    return ElasticError(
        f"{tag_dir}: written by {saved} rank(s) under ZeRO-3, resuming on {world}: ZeRO-3's partitioned "
        "parameters move to another world size only through DeepSpeed's universal checkpoints, which "
        f"this trainer does not load; resume on {saved} rank(s) (or train with zero2.json, which resumes "
        "on any number)"
    )


def check_zero3_world(ckpt_dir: Path, world: int) -> None:
    """Before anything loads (a large model takes minutes): under ZeRO-3, when every checkpoint a resume
    could take was written by another number of ranks, ElasticError naming the newest. Otherwise the
    checkpoint the resume chooses is checked again as it loads (load_on_new_size)."""
    folders = [ckpt_dir / f"{TAG_PREFIX}{step}" for step in tags(ckpt_dir)]
    written = [(folder, saved) for folder in folders if (saved := len(saved_ranks(folder)))]
    if written and all(saved != world for _, saved in written):
        raise _zero3_refusal(*written[-1], world)


def load_on_new_size(engine: Any, ckpt_dir: Path, tag: str, files: list[Path]) -> dict:
    """Resume checkpoint `tag`, written by `len(files)` ranks, on this world's ranks; returns the client
    state. Call with the engine's checkpoint engine already weights-only."""
    stage = int(engine.zero_optimization_stage())
    world = dist.get_world_size()
    if stage == 3:
        raise _zero3_refusal(ckpt_dir / tag, len(files), world)
    opt = engine.optimizer
    if not all(hasattr(opt, a) for a in ("single_partition_of_fp32_groups", "bit16_groups_flat")):
        raise ElasticError(
            f"{ckpt_dir / tag}: written by {len(files)} rank(s), resuming on {world}: DeepSpeed's "
            f"{type(opt).__name__} is not the ZeRO-1/2 optimizer whose partitions this trainer re-cuts; "
            f"resume on {len(files)} rank(s)"
        )
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=False)
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    saved = [load_weights_only(f, map_location="cpu")["optimizer_state_dict"] for f in files]
    _repartition(opt, saved)
    return client_state


def _repartition(opt: Any, saved: list[dict]) -> None:
    """Join the saved ranks' flat partitions of each parameter group, and keep this rank's share."""
    if any(any(any(p) for p in sd.get("param_alignment_paddings") or []) for sd in saved):
        raise ElasticError("the checkpoint's ZeRO groups hold alignment padding: resume it on its own size")
    base = [sd["base_optimizer_state"] for sd in saved]
    for i, group in enumerate(opt.optimizer.param_groups):
        target = opt.single_partition_of_fp32_groups[i]

        def mine(flat: torch.Tensor, i: int = i, target: torch.Tensor = target) -> torch.Tensor:
            full = torch.zeros(opt.bit16_groups_flat[i].numel(), dtype=flat.dtype)
            full[: flat.numel()] = flat
            rank = dist.get_rank(group=opt.real_dp_process_group[i])
            return opt.get_data_parallel_partitions(full, i)[rank].to(target.device)

        # fp32 master weights are saved without the partitions' padding; the moments with it
        target.data.copy_(mine(torch.cat([sd["single_partition_of_fp32_groups"][i] for sd in saved])))
        state: dict[str, Any] = {}
        for key, value in base[0]["state"][i].items():
            if torch.is_tensor(value) and value.dim() == 1:
                parts = [b["state"][i][key] for b in base]
                pads = [int(sd["group_paddings"][i]) for sd in saved]
                joined = [p[: p.numel() - pad] for p, pad in zip(parts, pads, strict=True)]
                state[key] = mine(torch.cat(joined))
            else:
                state[key] = value  # the step count: the same on every rank
        opt.optimizer.state[group["params"][0]] = state
        group.update({k: v for k, v in base[0]["param_groups"][i].items() if k != "params"})
