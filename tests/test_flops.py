"""The MFU's model FLOPs against torch's own FLOP counter (FlopCounterMode counts every matmul and
attention kernel of a real forward pass; backward is twice forward by the convention the formula uses)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ovis_model.modeling import Ovis
from ovis_model.tiny import write_tiny_parts
from ovis_model.train.flops import FlopsModel, device_peak_tflops


def test_model_flops_match_torchs_flop_counter(tmp_path: Path) -> None:
    llm, vit = write_tiny_parts(tmp_path, image_size=56)
    model = Ovis.from_parts(llm=llm, vit=vit, visual_vocab_size=64, attn_implementation="sdpa")
    flops = FlopsModel.of(model)
    tokens = 96
    with FlopCounterMode(display=False) as counted:
        model.llm(input_ids=torch.randint(0, 400, (1, tokens)))
    # 6N per token (the head included, the embedding lookup not) + 12 L H Q T^2 (no causal halving)
    assert flops.step_flops(tokens, tokens**2, 0, 0) == pytest.approx(3 * counted.get_total_flops(), rel=0.01)
    with FlopCounterMode(display=False) as counted:
        model.visual_tokenizer(torch.rand(2, 3, 56, 56))
    # per image: the patches only (a ViT's class token and attention are not in the 6 N P term)
    assert flops.step_flops(0, 0, 2, 0) == pytest.approx(3 * counted.get_total_flops(), rel=0.2)


def test_peak_override_and_unknown_devices() -> None:
    assert device_peak_tflops(torch.device("cpu"), 2.5) == 2.5
    assert device_peak_tflops(torch.device("cpu")) is None  # no MFU on CPU unless the peak is given
