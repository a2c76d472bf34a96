"""Trainable-module selection by the names the stage recipes use (`trainable = [...]` in pipelines/*.toml)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .modeling import Ovis

log = logging.getLogger(__name__)

TRAINABLE_NAMES = (
    "all",
    "llm",
    "visual_tokenizer",
    "visual_tokenizer.backbone",
    "visual_tokenizer.re_init_layers",
    "visual_tokenizer.head",
    "vte",
)


def _modules_for(model: Ovis, name: str) -> list[nn.Module]:
    vt = model.visual_tokenizer
    if name == "all":
        return [model]
    if name == "llm":
        return [model.llm]
    if name == "visual_tokenizer":
        return [vt]
    if name == "visual_tokenizer.backbone":
        return [vt.backbone]
    if name == "visual_tokenizer.head":
        return [vt.head]
    if name == "vte":
        return [model.vte]
    # visual_tokenizer.re_init_layers: the blocks re-initialised when the model was built from parts
    n_last = int(getattr(model.config, "re_init_layers", 0) or 0)
    if n_last <= 0:
        raise ValueError(
            "'visual_tokenizer.re_init_layers' needs a model built by Ovis.from_parts(re_init_layers=N>0)"
        )
    return list(vt.re_init_layer_dict(n_last).values())


_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def unit_of(param_name: str) -> str:
    """The module a parameter is reported under: a numbered block, else its parent module's path."""
    match = _LAYER.match(param_name)
    return match.group(1) if match else param_name.rsplit(".", 1)[0]


def module_states(model: nn.Module) -> dict[str, str]:
    """'train', 'freeze' or 'partial' for every block / leaf module, in definition order."""
    flags: dict[str, list[bool]] = {}
    for name, param in model.named_parameters():
        flags.setdefault(unit_of(name), []).append(param.requires_grad)
    return {u: "train" if all(f) else "freeze" if not any(f) else "partial" for u, f in flags.items()}


def select_trainable(
    model: Ovis, names: Iterable[str], logger: logging.Logger | None = None
) -> dict[str, list[str]]:
    """Freeze everything, then unfreeze the named parts; log every module trained and frozen.

    The ViT's post layer norm / pooling head stay frozen whatever the names: Ovis takes features before them.

    Returns {"train": [...], "freeze": [...]} by module. An unknown name is an error listing the valid ones.
    """
    names = list(names)
    unknown = [n for n in names if n not in TRAINABLE_NAMES]
    if unknown or not names:
        raise ValueError(
            f"unknown trainable module name(s) {unknown or names}; valid: {', '.join(TRAINABLE_NAMES)}"
        )
    modules = [m for n in names for m in _modules_for(model, n)]
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    # never in the loss: training them is a no-op, and under ZeRO a parameter without gradient is a hazard
    for module in model.visual_tokenizer.unused_modules().values():
        module.requires_grad_(False)
    logger = logger or log
    states = module_states(model)
    report: dict[str, list[str]] = {"train": [], "freeze": []}
    for unit, state in states.items():
        report["train" if state == "train" else "freeze"].append(unit)
        logger.info("%-6s %s", state, unit)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    logger.info(
        "trainable %s: %d of %d parameters (%.2f%%)", names, n_train, n_total, 100 * n_train / max(n_total, 1)
    )
    return report


def visual_sync_mode(model: Ovis, zero_stage: int) -> bool | None:
    """What `model.sync_visual_forward` should be under a DeepSpeed ZeRO stage: True when visual parts train
    under ZeRO-3, whose engine (0.19) re-applies a parameter's previous gradient in a step where it received
    none (measured in tests/test_model_deepspeed.py), so a rank without images must still run the ViT on a
    zero-weighted stand-in; else None (the model decides from the batch: see `Ovis._stand_in_needed`)."""
    visual = (p for m in (model.visual_tokenizer, model.vte) for p in m.parameters())
    return True if zero_stage == 3 and any(p.requires_grad for p in visual) else None
