"""Trainable-module selection: only the named parts get gradients; frozen ones stay bit-identical."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ovis_model import TRAINABLE_NAMES, collate_packed, select_trainable
from ovis_model.tiny import random_packed_record, tiny_ovis

# prefixes of the parameters each recipe trains (the ViT has 2 blocks; stage 1 re-initialises the last)
CASES = {
    "stage1": (
        ["visual_tokenizer.re_init_layers", "visual_tokenizer.head", "vte"],
        ("visual_tokenizer.backbone.encoder.layers.1.", "visual_tokenizer.head.", "vte."),
    ),
    "stage2": (["visual_tokenizer", "vte"], ("visual_tokenizer.", "vte.")),
    "stage3": (["all"], ("",)),
    "llm": (["llm"], ("llm.",)),
    "backbone": (["visual_tokenizer.backbone"], ("visual_tokenizer.backbone.",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_selected_modules_train(case: str, caplog) -> None:
    names, prefixes = CASES[case]
    model = tiny_ovis(seed=0)
    model.re_init_vit_layers(1)
    with caplog.at_level(logging.INFO, logger="ovis_model.trainable"):
        report = select_trainable(model, names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = random_packed_record(np.random.default_rng(0), [(9, 1), (7, 0), (8, 2)])
    batch = collate_packed([record], model.image_processor, model.num_visual_tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    unused = "visual_tokenizer.backbone.post_layernorm."  # outside the graph: always frozen
    for name, param in model.named_parameters():
        selected = name.startswith(prefixes) and not name.startswith(unused)
        assert param.requires_grad == selected, name
        if selected:
            assert param.grad is not None, name
        else:
            assert param.grad is None and torch.equal(param.detach(), before[name]), name
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved and all(n.startswith(prefixes) for n in moved)
    # every module is reported, trained or frozen, and logged
    assert set(report["train"]).isdisjoint(report["freeze"])
    assert any(u.startswith("vte") for u in report["train"] + report["freeze"])
    logged = caplog.text
    assert all(u in logged for u in report["train"] + report["freeze"])


def test_unknown_name_lists_valid_ones() -> None:
    model = tiny_ovis(seed=0)
    with pytest.raises(ValueError) as err:
        select_trainable(model, ["vte", "projector"])
    assert "projector" in str(err.value) and all(n in str(err.value) for n in TRAINABLE_NAMES)


def test_re_init_layers_needs_a_stage1_model() -> None:
    with pytest.raises(ValueError, match="re_init_layers"):
        select_trainable(tiny_ovis(seed=0), ["visual_tokenizer.re_init_layers"])
