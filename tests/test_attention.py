"""Attention for packed micro-batches without an L x L mask: every implementation equals the dense-mask SDPA
path (today's reference, still selectable as "sdpa") on small inputs, with and without images, in forward
and gradients. CUDA-only paths (compiled flex attention, varlen flash attention) skip without a GPU."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ovis_model.attention import (
    FLEX_PAD_MULTIPLE,
    block_causal_mask,
    default_attn_implementation,
    flex_block_mask,
    llm_attention_kwargs,
    pad_multiple,
)
from ovis_model.batching import collate_packed
from ovis_model.segment_attention import SEGMENT_ATTENTION, WINDOW, segment_windows
from ovis_model.tiny import random_packed_record, tiny_ovis

SPECS = [(11, 1), (7, 0), (13, 2), (5, 0), (9, 1)]
TEXT_ONLY = [(15, 0), (6, 0), (22, 0)]
CUDA = torch.cuda.is_available()


def _batch(model, specs_per_record, layout: str, seed: int = 1, pad_to: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    records = [random_packed_record(rng, specs) for specs in specs_per_record]
    return collate_packed(
        records, model.image_processor, model.num_visual_tokens, layout=layout, pad_to_multiple_of=pad_to
    )


def _loss_and_grads(model, batch: dict, attn: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.set_llm_attention(attn)
    model.zero_grad(set_to_none=True)
    out = model(**batch, return_logits=True)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum.detach(), out.logits.detach(), grads


@pytest.fixture(scope="module")
def model():
    m = tiny_ovis(seed=0)
    m.train()
    return m


@pytest.mark.parametrize("attn", [SEGMENT_ATTENTION, "eager"])
@pytest.mark.parametrize(
    ("specs", "layout"),
    [([SPECS], "concat"), ([TEXT_ONLY], "concat"), ([SPECS[:2], SPECS[2:]], "rows")],
    ids=["images-concat", "text-only", "images-rows-padded"],
)
def test_implementation_equals_dense_mask(model, attn: str, specs, layout: str) -> None:
    batch = _batch(model, specs, layout)
    try:
        ref_loss, ref_logits, ref_grads = _loss_and_grads(model, batch, "sdpa")
        loss, logits, grads = _loss_and_grads(model, batch, attn)
    finally:
        model.set_llm_attention("sdpa")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), name


def test_segment_windows_cover_rows_and_group_short_segments() -> None:
    lengths = [3, 4, 700, 5, 6, 600, 1]
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    windows = segment_windows(segments)[0]
    spans = [(s, e) for s, e, _ in windows]
    assert spans == [(0, 7), (7, 707), (707, 718), (718, 1318), (1318, 1319)]
    # single segments run causal with no mask; grouped ones get a small block-causal mask
    masks = [m for _, _, m in windows]
    assert masks[1] is None and masks[3] is None and masks[4] is None
    assert torch.equal(masks[0], block_causal_mask(segments[:, :7])[0, 0])
    assert all(m is None or m.shape[0] <= WINDOW for m in masks)
    # no mask of the micro-batch's size: what the LLM receives
    kwargs = llm_attention_kwargs(SEGMENT_ATTENTION, segments, torch.float32)
    assert kwargs["attention_mask"].numel() == 0 and kwargs["segment_windows"][0][2][0] == 707


def test_segment_attention_without_windows_is_sdpa_for_padded_generation(model) -> None:
    """Outside packed training (generation, left padding), sdpa_segments builds SDPA's own masks."""
    ids = torch.randint(1, 200, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        try:
            model.set_llm_attention(SEGMENT_ATTENTION)
            a = model.llm(input_ids=ids, attention_mask=mask).logits
            model.set_llm_attention("sdpa")
            b = model.llm(input_ids=ids, attention_mask=mask).logits
        finally:
            model.set_llm_attention("sdpa")
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, 3:], b[1, 3:], atol=1e-5)


@pytest.mark.parametrize(
    "lengths", [[100, 50, 150], [128, 128, 256], [1, 255, 1], [30] * 20 + [40], [64] * 4]
)
def test_flex_block_mask_equals_create_block_mask(lengths: list[int]) -> None:
    """The tile-level BlockMask built from segment bounds equals flex's own dense evaluation of the mask,
    tile by tile (partial and full tiles), and attends like the dense mask (flex run eagerly on CPU)."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    seg = torch.stack([seg, seg.flip(0).max() - seg.flip(0)])  # two rows, different layouts
    length = seg.shape[1]
    ours = flex_block_mask(seg, block=64)

    def document_causal(b, h, q, kv):  # noqa: ANN001
        return (seg[b, q] == seg[b, kv]) & (kv <= q)

    ref = create_block_mask(document_causal, 2, None, length, length, device="cpu", BLOCK_SIZE=64)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, length, 8) for _ in range(3))
    with warnings.catch_warnings():  # "called without torch.compile": the eager reference is the point
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=ours)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(seg))
    assert (out - dense).abs().max().item() < 1e-5


def test_defaults_never_fall_to_the_dense_mask() -> None:
    assert default_attn_implementation("cpu") == SEGMENT_ATTENTION
    assert default_attn_implementation("cpu", packed=False) == "sdpa"  # chat: one sequence, no mask
    flash = importlib.util.find_spec("flash_attn") is not None
    assert default_attn_implementation("cuda") == ("flash_attention_2" if flash else "flex_attention")
    assert pad_multiple("flex_attention") == FLEX_PAD_MULTIPLE and FLEX_PAD_MULTIPLE % 128 == 0
    assert pad_multiple(SEGMENT_ATTENTION) is None


@pytest.mark.skipif(not CUDA, reason="compiled flex attention and varlen flash attention need a GPU")
@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2"])
def test_cuda_implementations_equal_dense_mask(attn: str) -> None:
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    model = tiny_ovis(seed=0).cuda().to(torch.bfloat16).train()
    batch = _batch(model, [SPECS, TEXT_ONLY], "concat", pad_to=FLEX_PAD_MULTIPLE)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    ref_loss, ref_logits, _ = _loss_and_grads(model, batch, "sdpa")
    loss, logits, _ = _loss_and_grads(model, batch, attn)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    assert (logits.float() - ref_logits.float()).abs().max().item() < 0.1  # bf16 noise
