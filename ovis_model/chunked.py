"""The two vocabulary-wide products of a training step, computed in chunks of rows.

- The LM loss: supervised positions x the text vocabulary (151,936 words for Qwen2.5) would be one
  `[positions, vocab]` logits tensor, kept for backward with its softmax.
- The visual head: every patch of every image x the visual vocabulary (131,072 words in the recipes): the
  head's logits, their layer norm and softmax and the probabilities' product with the VTE each keep a
  `[patches, V]` tensor, ~300 MB per 576-patch image in fp32.

Both run a chunk of rows at a time (`rows_per_chunk`: a budget of elements per `[rows, V]` tensor) under
non-reentrant activation checkpointing: forward keeps only each chunk's input and small output, backward
recomputes one chunk's wide tensors at a time. Memory then follows the chunk, not the micro-batch; the cost
is one more forward of these products. Results and gradients equal the unchunked computation up to float
summation order (tests/test_model_memory.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .constants import IGNORE_INDEX
from .tiled_loss import tileable, tiled_lm_loss_sum
from .tiles import zero3_partitioned
from .visual_head import fusable, tiled_soft_embeddings

# elements of one chunk's widest tensor: 2**24 floats = 64 MiB in fp32 (a few such tensors live at once)
CHUNK_ELEMENTS = 2**24


def rows_per_chunk(width: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(width, 1))


def _needs_graph(inputs: torch.Tensor, *modules: torch.nn.Module) -> bool:
    """Whether backward will run through these: only then is recomputing worth it (else no graph is kept)."""
    return torch.is_grad_enabled() and (
        inputs.requires_grad or any(p.requires_grad for m in modules for p in m.parameters())
    )


def chunked_rows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    rows: torch.Tensor,
    chunk: int,
    *owners: torch.nn.Module,
) -> list[torch.Tensor]:
    """`fn` over `rows` `[N, ...]` a chunk of `chunk` rows at a time, recomputed in backward (checkpoint)
    when a gradient will flow through `rows` or the `owners`' parameters."""
    recompute = _needs_graph(rows, *owners)
    out = []
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        out.append(checkpoint(fn, part, use_reentrant=False) if recompute else fn(part))
    return out


# -- LM loss -------------------------------------------------------------------------------------------------
def lm_loss_sum(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk_elements: int | None = CHUNK_ELEMENTS,
    tiled: bool = True,
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` `[N, vocab]` against `targets` `[N]` (no IGNORE_INDEX left),
    in float32, without ever holding all N rows of logits. `chunk_elements=None`: the plain computation. On
    a CPU a plain linear head goes through ovis_model.tiled_loss (cache-sized tiles) unless `tiled` is
    False."""

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), t, reduction="sum")

    if chunk_elements is None or hidden.shape[0] == 0:  # (empty: a 0 still attached to the graph)
        return chunk_loss(hidden, targets)
    fused = _liger_loss(head, hidden, targets, softcap)
    if fused is not None:
        return fused
    if tiled and tileable(head, hidden, softcap):
        return tiled_lm_loss_sum(head, hidden, targets)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # (ZeRO-3: the weight is a partition)
    chunk = rows_per_chunk(vocab, chunk_elements)
    recompute = _needs_graph(hidden, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        part = checkpoint(chunk_loss, h, t, use_reentrant=False) if recompute else chunk_loss(h, t)
        total = total + part
    return total


def _liger_loss(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None
) -> torch.Tensor | None:
    """Liger's fused linear-cross-entropy (Triton, CUDA) where installed; None elsewhere. Not under ZeRO-3,
    whose head weight is a gathered-on-call partition (the chunked path calls the module instead)."""
    if not hidden.is_cuda or zero3_partitioned(head) or not isinstance(head, torch.nn.Linear):
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    loss = liger_fused_linear_cross_entropy(
        hidden, head.weight, targets, bias=head.bias, ignore_index=IGNORE_INDEX, reduction="sum",
        softcap=softcap,
    )  # fmt: skip
    return (loss[0] if isinstance(loss, tuple) else loss).float()  # some versions also return a z-loss


# -- visual head ---------------------------------------------------------------------------------------------
def soft_visual_embeddings(
    visual_tokenizer: torch.nn.Module,
    vte: torch.nn.Module,
    features: torch.Tensor,
    chunk_elements: int | None = CHUNK_ELEMENTS,
    tiled: bool = True,
) -> torch.Tensor:
    """`[n, patches, hidden]` = `vte(tokenize(head(features)))` for `features` `[n, patches, width]`, a chunk
    of patch rows (a few images' worth) at a time. `chunk_elements=None`: all at once. A softmax head on a
    CPU goes through ovis_model.visual_head instead (cache-sized tiles, no chunk budget) unless `tiled` is
    False."""

    def embed(rows: torch.Tensor) -> torch.Tensor:
        return vte(visual_tokenizer.tokenize(visual_tokenizer.head(rows)))

    n, patches, width = features.shape
    if chunk_elements is None:
        return embed(features)
    head = visual_tokenizer.head
    if tiled and fusable(head, visual_tokenizer.config.tokenize_function, features):
        embeds = tiled_soft_embeddings(head, vte.weight[: head[0].out_features], features.reshape(-1, width))
        return embeds.reshape(n, patches, -1)
    words = visual_tokenizer.config.vocab_size
    flat = features.reshape(n * patches, width)
    parts = chunked_rows(embed, flat, rows_per_chunk(words, chunk_elements), visual_tokenizer.head, vte)
    return torch.cat(parts).reshape(n, patches, -1)
