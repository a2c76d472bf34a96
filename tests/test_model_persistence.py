"""Stage 1 from parts, save/load of a self-contained directory, the stage-2 load, and chat on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call
from PIL import Image
from safetensors.torch import load_file

from ovis_model import Ovis, collate_packed, select_trainable
from ovis_model.attention import default_attn_implementation
from ovis_model.modeling import load_vision_backbone
from ovis_model.tiny import random_packed_record, write_tiny_parts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> tuple[Ovis, Path, Path]:
    root = tmp_path_factory.mktemp("parts")
    llm_dir, vit_dir = write_tiny_parts(root)
    model = Ovis.from_parts(llm=llm_dir, vit=vit_dir, visual_vocab_size=64, re_init_layers=1)
    out = root / "stage1"
    model.save_pretrained(out)
    return model, vit_dir, out


def _batch(model: Ovis, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    record = random_packed_record(rng, [(9, 1), (6, 0), (8, 1)], vocab_size=1000)
    return collate_packed([record], model.image_processor, model.num_visual_tokens)


def test_from_parts_builds_stage1(stage1) -> None:
    model, vit_dir, _ = stage1
    assert model.config.conversation_template == "qwen"
    assert model.config.visual_tokenizer_config.drop_cls_token is True
    assert model.num_visual_tokens == 4 + 2
    assert model.vte.weight.shape == (64, 32)
    assert model.text_tokenizer is not None and model.image_processor.image_size == 28
    # the ViT's last block is re-initialised, the others are the base ViT's
    base = load_vision_backbone(vit_dir).state_dict()
    ours = model.visual_tokenizer.backbone.state_dict()
    changed = {k for k in base if not torch.equal(base[k], ours[k])}
    assert changed and all("encoder.layers.1." in k for k in changed)
    assert any(k.endswith("proj.weight") for k in changed)
    assert model.config.re_init_layers == 1


def test_save_load_round_trip_offline(stage1, monkeypatch) -> None:
    model, _, out = stage1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "ovis"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a model folder loads for chat with one-sequence attention; with the training one it computes the same
    assert Ovis.from_pretrained(out).attn_implementation == default_attn_implementation(packed=False)
    loaded = Ovis.from_pretrained(out, attn_implementation=model.attn_implementation)
    saved = load_file(out / "model.safetensors")
    current = loaded.state_dict()
    assert all(torch.equal(saved[k], current[k]) for k in saved)
    model.eval(), loaded.eval()
    batch = _batch(model)
    with torch.no_grad():
        a, b = model(**batch, return_logits=True), loaded(**batch, return_logits=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss_sum, b.loss_sum)
    assert loaded.text_tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert loaded.image_processor == model.image_processor


def test_stage2_starts_from_stage1_directory(stage1, monkeypatch) -> None:
    _, _, out = stage1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = Ovis.from_pretrained(out)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    select_trainable(model, ["visual_tokenizer", "vte"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    out_ = model(**_batch(model, seed=1))
    out_.loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("llm."))
    assert not torch.equal(before["vte.weight"], after["vte.weight"])


def test_chat_greedy_and_sampling(stage1) -> None:
    model, _, _ = stage1
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    first = model.chat(image, "What is in the picture?", max_new_tokens=6)
    again = model.chat(image, "What is in the picture?", max_new_tokens=6)
    assert first.output == again.output and 1 <= first.output_tokens <= 6
    assert first.prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert first.prompt.endswith("<image> What is in the picture?<|im_end|>\n<|im_start|>assistant\n")
    text_ids = model.text_tokenizer(first.prompt.replace("<image>", ""))["input_ids"]
    assert first.prompt_tokens == len(text_ids) + model.num_visual_tokens
    sampled = [
        model.chat(image, "Describe.", max_new_tokens=6, do_sample=True, seed=s).output for s in (1, 1)
    ]
    assert sampled[0] == sampled[1]
    text_only = model.chat(None, "Hello", max_new_tokens=3)
    assert text_only.prompt_tokens == len(model.text_tokenizer(text_only.prompt)["input_ids"])


def test_ovis_chat_command(stage1, tmp_path, capsys, monkeypatch) -> None:
    """Through the entry point in this process (test_runner runs `ovis-chat` as a process)."""
    _, _, out = stage1
    image = tmp_path / "cat.png"
    Image.new("RGB", (50, 20), (200, 10, 10)).save(image)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [str(out), "--image", str(image), "What colour?", "--max-new-tokens", "4", "--json"]
    code, stdout, stderr = call(capsys, monkeypatch, "ovis-chat", *args)
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout)
    assert result["prompt"].endswith("<|im_start|>assistant\n") and result["output_tokens"] <= 4
    assert result["total_tokens"] == result["prompt_tokens"] + result["output_tokens"]


def test_vision_half_of_a_dual_encoder_checkpoint(tmp_path) -> None:
    """`vit=` may point at a whole CLIP checkpoint (as openai/clip-vit-large-patch14-336 is)."""
    from transformers import CLIPConfig, CLIPModel

    from ovis_model.tiny import tiny_vit_config

    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99
    )
    clip = CLIPModel(
        CLIPConfig(text_config=text, vision_config=tiny_vit_config().to_dict(), projection_dim=16)
    )
    clip.save_pretrained(tmp_path)
    backbone = load_vision_backbone(tmp_path)
    assert type(backbone).__name__ == "CLIPVisionModel"
    full = clip.vision_model.state_dict()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, full[key.removeprefix("vision_model.")]), key
