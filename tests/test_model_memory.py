"""Memory linear in tokens: the chunked LM loss and visual head equal the plain computations (forward and
autograd gradients), the trainer reports each step's peak memory, and a micro-batch budget that cannot fit
is refused before the first step with one line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import train_here
from test_train import FAST, ovis_train

from ovis_model.batching import collate_packed
from ovis_model.chunked import lm_loss_sum, rows_per_chunk, soft_visual_embeddings
from ovis_model.tiled_loss import tileable, tiled_lm_loss_sum
from ovis_model.tiny import random_packed_record, tiny_ovis
from ovis_model.train.memory import Shapes, estimate_bytes, largest_fitting
from ovis_model.visual_head import fusable, tiled_soft_embeddings


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize(("softcap", "tiled"), [(None, True), (None, False), (30.0, False)])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_lm_loss_equals_plain_with_gradients(
    softcap: float | None, tiled: bool, frozen_head: bool
) -> None:
    """The checkpointed chunks (with and without a softcap) and, for a plain head on a CPU, the tiles: the
    loss and its gradients equal the plain cross-entropy's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=False)
    head.weight.requires_grad_(not frozen_head)
    hidden = torch.randn(53, 16, requires_grad=True)
    targets = torch.randint(0, 97, (53,))
    results = []
    for chunk_elements in (None, 97 * 8):  # plain; 8 rows per chunk (7 chunks, the last partial)
        hidden.grad = head.weight.grad = None
        loss = lm_loss_sum(head, hidden, targets, softcap, chunk_elements, tiled=tiled)
        loss.backward()
        weight_grad = None if frozen_head else head.weight.grad.clone()
        results.append((loss.detach(), hidden.grad.clone(), weight_grad))
    (plain, gh0, gw0), (chunked, gh1, gw1) = results
    assert rows_per_chunk(97, 97 * 8) == 8
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(gh1, gh0, atol=1e-6)
    assert frozen_head or torch.allclose(gw1, gw0, atol=1e-5)
    # no supervised position: 0, still attached to the graph
    empty = lm_loss_sum(head, hidden[:0], targets[:0], softcap)
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize(
    ("tokenize", "tiled"),
    [("softmax", True), ("softmax", False), ("gumbel_argmax", False), ("st_argmax", False)],
)
def test_chunked_visual_head_equals_plain_with_gradients(tokenize: str, tiled: bool) -> None:
    """The checkpointed chunks (every tokenize function) and, for the softmax on a CPU, the tiled
    attention-shaped path: the same embeddings and gradients as the head computed in one piece."""
    model = tiny_ovis(visual_vocab_size=96, seed=2).train()
    vt = model.visual_tokenizer
    vt.config.tokenize_function = tokenize
    torch.manual_seed(3)
    features = torch.randn(5, 4, vt.head[0].in_features, requires_grad=True)
    params = [vt.head[0].weight, vt.head[1].weight, vt.head[1].bias, model.vte.weight]
    results = []
    for chunk_elements in (None, 96 * 3):  # all 20 patch rows at once; 3 rows a chunk (recomputed)
        for t in (features, *params):
            t.grad = None
        torch.manual_seed(7)  # gumbel noise: the same draws in both (the checkpoint replays the RNG)
        out = soft_visual_embeddings(vt, model.vte, features, chunk_elements, tiled=tiled)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), _grads(features, *params)))
    (out0, g0), (out1, g1) = results
    assert out1.shape == (5, 4, model.config.llm_config.hidden_size)
    assert torch.allclose(out1, out0, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_tiled_lm_loss_over_many_tiles() -> None:
    """Rows and words over several partial tiles, logits far from 0, repeated targets: the loss and the
    gradients of hidden and head equal F.cross_entropy's."""
    torch.manual_seed(12)
    head = torch.nn.Linear(8, 97, bias=False)
    with torch.no_grad():
        head.weight.mul_(6.0)
    hidden = torch.randn(23, 8, requires_grad=True)
    targets = torch.tensor([5, 5, 96, 0] * 5 + [40, 41, 5])
    results = []
    for compute in (
        lambda: F.cross_entropy(head(hidden), targets, reduction="sum"),
        lambda: tiled_lm_loss_sum(head, hidden, targets, tile=(4, 16)),
    ):
        hidden.grad = head.weight.grad = None
        loss = compute()
        (loss * 0.7).backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6)
    assert torch.allclose(gh1, gh0, atol=1e-5) and torch.allclose(gw1, gw0, atol=1e-5)
    assert tileable(head, hidden, None) and not tileable(head, hidden, 30.0)


@pytest.mark.parametrize("affine", [True, False])
def test_tiled_visual_head_over_many_tiles(affine: bool) -> None:
    """Rows and words over several tiles (the last ones partial), scores far from 0 (the online softmax's
    rescaling matters), a layer norm with and without its own scale and shift: equal to softmax(head(x)) E,
    values and gradients of x, the head and the table."""
    torch.manual_seed(11)
    head = torch.nn.Sequential(
        torch.nn.Linear(8, 94, bias=False), torch.nn.LayerNorm(94, elementwise_affine=affine)
    )
    if affine:
        with torch.no_grad():
            head[1].weight.uniform_(2.0, 6.0)
            head[1].bias.uniform_(-3.0, 3.0)
    table = torch.randn(96, 6, requires_grad=True)
    rows = torch.randn(20, 8, requires_grad=True)
    tensors = [rows, table, *head.parameters()]
    results = []
    for compute in (
        lambda: head(rows).softmax(-1) @ table[:94],
        lambda: tiled_soft_embeddings(head, table[:94], rows, tile=(3, 16)),
    ):
        for t in tensors:
            t.grad = None
        out = compute()
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), _grads(*tensors)))
    (out0, g0), (out1, g1) = results
    assert torch.allclose(out1, out0, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert fusable(head, "softmax", rows) and not fusable(head, "st_argmax", rows)


def test_model_loss_and_grads_equal_with_and_without_chunks() -> None:
    """The whole forward: chunked LM loss and visual head inside Ovis.forward, images in the batch."""
    model = tiny_ovis(seed=4).train()
    rng = np.random.default_rng(5)
    record = random_packed_record(rng, [(11, 1), (7, 0), (13, 2)])
    batch = collate_packed([record], model.image_processor, model.num_visual_tokens, layout="concat")
    runs = []
    for chunk_elements in (None, 256 * 5):  # 5 rows of the 256-word LM head; 20 patch rows of 64 words
        model.loss_chunk_elements = model.visual_chunk_elements = chunk_elements
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((out.loss_sum.item(), grads))
    (l0, g0), (l1, g1) = runs
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert g1.keys() == g0.keys() and any(n.startswith("vte.") for n in g0)
    for name, g in g0.items():
        assert torch.allclose(g1[name], g, atol=1e-5, rtol=1e-4), name


def test_estimate_grows_linearly_except_for_dense_attention() -> None:
    """The budget estimate: linear in tokens for the mask-free implementations, quadratic for the dense
    mask; the recipe's stage-1 budget on the demo's model stays far below 6 GiB with them."""
    model = tiny_ovis(seed=0)
    shapes = Shapes.of(model)
    common = dict(trained_parameters=10**6, dtype_bytes=4, capacity=1024)

    def total(tokens: int, attn: str) -> int:
        return sum(estimate_bytes(shapes, tokens, attn_implementation=attn, **common).values())

    for attn in ("sdpa_segments", "flex_attention", "flash_attention_2"):
        grow = (total(32768, attn) - total(16384, attn)) / (total(16384, attn) - total(8192, attn))
        assert grow == pytest.approx(2.0, rel=0.05), attn
    dense = (total(32768, "sdpa") - total(16384, "sdpa")) / (total(16384, "sdpa") - total(8192, "sdpa"))
    assert dense > 3.5
    assert largest_fitting(lambda t: t <= 5000, 16384) == 4864
    assert largest_fitting(lambda t: False, 16384) is None


def test_peak_memory_per_step_and_a_budget_that_cannot_fit(
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    llm_dir, vit_dir = parts
    base = ["--stage", "1", "--data", str(packed), "--llm", str(llm_dir), "--vit", str(vit_dir), *FAST]
    run = ovis_train(*base, "--out", str(tmp_path / "ok"), "--max-steps", "2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "ok" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(0 < r["peak_memory_mib"] < 6 * 1024 for r in steps)
    config = json.loads((tmp_path / "ok" / "stage1" / "config.json").read_text())
    assert config["config"]["model"]["attn_implementation"] == "auto"
    assert config["attn_implementation"] == "sdpa_segments"  # "auto" on CPU: never the dense mask
    # the dense mask at a budget of 400k tokens: ~10^12 bytes of mask and scores; refused before any step
    # (in this process: the peak above is a process's, the refusal is not)
    out = tmp_path / "big"
    big = train_here(*base, "--out", str(out), "--micro-batch-tokens", "400000", "--set",
                     "model.attn_implementation=sdpa")  # fmt: skip
    assert big.returncode == 2, big.stdout[-2000:] + big.stderr[-2000:]
    lines = big.stderr.strip().splitlines()
    assert lines[-1].startswith("error: a micro-batch of 400,000 tokens needs about"), big.stderr[-2000:]
    assert "lower --micro-batch-tokens to" in lines[-1] and "Traceback" not in big.stderr
    assert not (out / "stage1" / "metrics.jsonl").exists()  # refused before the metrics start
