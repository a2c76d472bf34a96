"""Packed sequences: each sub-sample's loss and logits equal those of the sub-sample run alone (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovis_model.attention import block_causal_mask, cu_seqlens_from_lengths, llm_attention_kwargs
from ovis_model.batching import collate_packed, count_targets, expand_image_placeholders
from ovis_model.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from ovis_model.tiny import random_packed_record, split_record, tiny_ovis

# sub-samples as (text tokens, images): with and without images, one with two images
SPECS = [(11, 1), (7, 0), (13, 2), (5, 0), (9, 1)]


def _collate(model, records, layout="rows"):
    return collate_packed(records, model.image_processor, model.num_visual_tokens, layout=layout)


def _check_equivalence(model, record, layout="concat", atol=2e-5):
    """Compare per-sub-sample logits and loss sums, packed vs alone; return the worst logit difference."""
    packed = _collate(model, [record], layout=layout)
    with torch.no_grad():
        out = model(**packed, return_logits=True)
    segments = packed["segment_ids"][0]
    worst, loss_total, tokens_total = 0.0, 0.0, 0
    for i, sub in enumerate(split_record(record)):
        alone = _collate(model, [sub])
        with torch.no_grad():
            ref = model(**alone, return_logits=True)
        diff = (out.logits[0][segments == i] - ref.logits[0]).abs().max().item()
        worst = max(worst, diff)
        loss_total += ref.loss_sum.item()
        tokens_total += int(ref.n_tokens)
    assert worst < atol
    assert out.loss_sum.item() == pytest.approx(loss_total, rel=1e-5)
    assert int(out.n_tokens) == tokens_total == packed["n_supervised"]
    return worst


@pytest.fixture(scope="module")
def model():
    return tiny_ovis(seed=0).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_alone(model, attn: str) -> None:
    model.set_llm_attention(attn)
    try:
        record = random_packed_record(np.random.default_rng(1), SPECS)
        _check_equivalence(model, record)
    finally:
        model.set_llm_attention("sdpa")


def test_packed_equals_alone_siglip_with_hidden_stride() -> None:
    m = tiny_ovis(vit="siglip", image_size=56, hidden_stride=2, seed=3).eval()
    assert m.num_visual_tokens == (56 // 14) ** 2 // 4 + 2
    record = random_packed_record(np.random.default_rng(2), SPECS[:3], image_side=56)
    _check_equivalence(m, record)


def test_rows_layout_with_padding_equals_concat(model) -> None:
    rng = np.random.default_rng(4)
    records = [random_packed_record(rng, SPECS[:2]), random_packed_record(rng, SPECS[2:])]
    rows = _collate(model, records, layout="rows")
    concat = _collate(model, records, layout="concat")
    assert rows["input_ids"].shape[0] == 2 and concat["input_ids"].shape[0] == 1
    with torch.no_grad():
        a, b = model(**rows), model(**concat)
    assert a.loss_sum.item() == pytest.approx(b.loss_sum.item(), rel=1e-5)
    assert int(a.n_tokens) == int(b.n_tokens) == rows["n_supervised"] == concat["n_supervised"]


def test_collate_layout_positions_and_cu_seqlens(model) -> None:
    record = random_packed_record(np.random.default_rng(5), SPECS)
    batch = _collate(model, [record], layout="concat")
    t = model.num_visual_tokens
    expanded = [n - k + k * t for (n, k) in ((n + k, k) for n, k in SPECS)]  # tokens include placeholders
    assert batch["input_ids"].shape == (1, sum(expanded))
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == t * sum(k for _, k in SPECS)
    assert (batch["labels"][batch["input_ids"] == IMAGE_TOKEN_ID] == IGNORE_INDEX).all()
    assert batch["cu_seqlens"].tolist() == [0, *np.cumsum(expanded).tolist()]
    assert batch["max_seqlen"] == max(expanded)
    starts = batch["cu_seqlens"][:-1].tolist()
    assert (batch["position_ids"][0, starts] == 0).all()
    assert batch["pixel_values"].shape == (sum(k for _, k in SPECS), 3, 28, 28)


def test_expand_placeholders_and_target_count() -> None:
    ids = np.array([5, -200, 6, 7, 8, -200, -200, 9], dtype=np.int32)
    labels = np.array([-100, -100, 6, 7, 8, -100, -100, 9], dtype=np.int32)
    new_ids, new_labels, lengths = expand_image_placeholders(ids, labels, np.array([4, 4]), 3)
    assert lengths.tolist() == [4 - 1 + 3, 4 - 2 + 6]
    assert new_ids.tolist() == [5, -200, -200, -200, 6, 7, 8, *[-200] * 6, 9]
    assert new_labels.tolist() == [-100, -100, -100, -100, 6, 7, 8, *[-100] * 6, 9]
    # targets are labels shifted within a sub-sample: the first token of a sub-sample is never a target
    assert count_targets(new_labels, lengths) == 3 + 1 - 1  # 6, 7 in the first; 9 in the second; not 8


def test_targets_do_not_cross_sub_sample_boundaries(model) -> None:
    """A supervised first token of the next sub-sample must not be predicted from the previous one."""
    ids = np.array([3, 4, 5, 6, 7, 8], dtype=np.int32)
    labels = ids.copy()  # everything supervised, including each sub-sample's first token
    record = {"input_ids": ids, "labels": labels, "lengths": np.array([3, 3], dtype=np.int32), "images": []}
    batch = _collate(model, [record])
    assert batch["n_supervised"] == 4
    with torch.no_grad():
        assert int(model(**batch).n_tokens) == 4


def test_block_causal_mask_and_varlen_kwargs() -> None:
    segments = torch.tensor([[0, 0, 1, 1, 1]])
    mask = block_causal_mask(segments)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    kwargs = llm_attention_kwargs("flash_attention_2", segments, torch.bfloat16)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 2, 5] and kwargs["max_length_q"] == 3
    assert kwargs["attention_mask"] is None
    assert cu_seqlens_from_lengths([2, 3]).dtype == torch.int32
    eager = llm_attention_kwargs("eager", segments, torch.float32)["attention_mask"]
    assert eager.dtype == torch.float32 and eager[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_loss_normalizer_and_mismatch_errors(model) -> None:
    record = random_packed_record(np.random.default_rng(6), SPECS[:2])
    batch = _collate(model, [record])
    with torch.no_grad():
        out = model(**batch, loss_normalizer=1000.0)
    assert out.loss.item() == pytest.approx(out.loss_sum.item() / 1000.0)
    with pytest.raises(TypeError, match="loss_normaliser"):  # misspelt: an error, never the local mean
        model(**batch, loss_normaliser=1000.0)
    with pytest.raises(ValueError, match="image placeholders"):
        model(input_ids=torch.tensor([[1, IMAGE_TOKEN_ID, 2]]), pixel_values=batch["pixel_values"])
    bad = dict(record, images=[])
    with pytest.raises(ValueError, match="1 image placeholders but 0 images"):
        _collate(model, [bad])
