"""Checkpoint files are loaded weights-only: resuming never runs code from a run folder.

A DeepSpeed checkpoint is a set of pickles, and DeepSpeed loads them with `torch.load(weights_only=False)`:
a `.pt` replaced by a pickle that calls a function would run it on `--resume`. Run folders are copied
between machines and shared on clusters, so the trainer gives the engine a checkpoint engine that loads
with `weights_only=True` and allows exactly the classes DeepSpeed's ZeRO checkpoints hold besides
tensors and plain containers (found by loading ZeRO-2 and ZeRO-3 checkpoints, fp32 and bf16, weights-only).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as data only (it names code to run, or is not a pickle)."""


def allowed_globals() -> list[Any]:
    """The non-tensor classes in DeepSpeed's checkpoints: the loss scaler's state (an object), the ZeRO
    stage (an enum) and, in ZeRO-1/2 optimizer states, fragment addresses (a dataclass). Each is rebuilt
    from its fields; none of their methods runs while loading."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load` of a checkpoint file as data: tensors, containers and `allowed_globals()` only."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler's errors have no common type
        if "Weights only load failed" in str(e) or "GLOBAL" in str(e):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"it calls {found.group(1)}" if found else type(e).__name__
            raise UnsafeCheckpointError(
                f"{path}: refused, it is not weights-only data ({what}); a checkpoint from another source? "
                "Resume from a checkpoint this trainer wrote"
            ) from e
        raise


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine (same files, same saving) whose `load` is weights-only."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_weights_only(path, map_location)


def make_weights_only(engine: Any) -> None:
    """Swap the engine's checkpoint engine for the weights-only one (the files it writes are unchanged)."""
    current = getattr(engine, "checkpoint_engine", None)
    if current is not None and type(current) is not TorchCheckpointEngine:
        raise ValueError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}")
    replacement = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    replacement.__dict__.update(current.__dict__ if current is not None else {})
    if current is None:
        replacement.__init__(None)
    engine.checkpoint_engine = replacement
