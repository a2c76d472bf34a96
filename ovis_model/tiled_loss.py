"""The LM loss on a CPU: the head's logits and their cross-entropy in cache-sized tiles.

`sum_i logsumexp(h_i W^T) - h_i . w_{t_i}` over the supervised rows, computed the way flash attention
computes a softmax: a `[rows, words]` tile of logits at a time, the log-sum-exp kept per row online, and in
backward each tile recomputed from it (`softmax - onehot`, times the incoming gradient) and multiplied into
the gradients of h and W. No logits tensor beyond one tile, and no pass over 151,936-wide rows through main
memory, which is what bounds the chunked loss (ovis_model/chunked.py) on a CPU. Equal to
`F.cross_entropy(h W^T, t, reduction="sum")` within float summation order (tests/test_model_memory.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .tiles import TILE_COLS, TILE_ROWS, zero3_partitioned


class TiledLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight^T` against `targets` (all valid), fp32, tile by tile."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        tile_rows: int,
        tile_cols: int,
    ) -> torch.Tensor:
        n, words = hidden.shape[0], weight.shape[0]
        lse = hidden.new_empty(n)
        # the target's logit, a dot product per row, without the tiles
        picked = (hidden * weight[targets]).sum(1)
        for r0 in range(0, n, tile_rows):
            hr = hidden[r0 : r0 + tile_rows]
            best = hidden.new_full((hr.shape[0],), float("-inf"))
            total = hidden.new_zeros(hr.shape[0])
            for c0 in range(0, words, tile_cols):
                logits = hr @ weight[c0 : c0 + tile_cols].t()
                new_best = torch.maximum(best, logits.amax(1))
                total = total.mul_(torch.exp(best - new_best)).add_(
                    logits.sub_(new_best[:, None]).exp_().sum(1)
                )
                best = new_best
            lse[r0 : r0 + tile_rows] = best + total.log()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.tile = (tile_rows, tile_cols)
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        tile_rows, tile_cols = ctx.tile
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.zeros_like(hidden) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        # d/dlogits = softmax - onehot(target): the onehot part is a row-wise rank-one term, applied once
        if need_h:
            dh -= weight[targets] * grad
        if need_w:
            dw.index_add_(0, targets, hidden * -grad)
        for r0 in range(0, hidden.shape[0], tile_rows):
            hr, lse_r = hidden[r0 : r0 + tile_rows], lse[r0 : r0 + tile_rows, None]
            for c0 in range(0, weight.shape[0], tile_cols):
                wc = weight[c0 : c0 + tile_cols]
                probs = (hr @ wc.t()).sub_(lse_r).exp_().mul_(grad)
                if dh is not None:
                    dh[r0 : r0 + tile_rows].addmm_(probs, wc)
                if dw is not None:
                    dw[c0 : c0 + tile_cols].addmm_(probs.t(), hr)
        return dh, dw, None, None, None


def tileable(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> bool:
    """A bias-free linear head without a softcap, on a CPU, not a ZeRO-3 partition (gathered only by
    calling the module)."""
    return (
        hidden.device.type == "cpu"
        and not softcap
        and isinstance(head, nn.Linear)
        and head.bias is None
        and not zero3_partitioned(head)
    )


def tiled_lm_loss_sum(
    head: nn.Linear,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    tile: tuple[int, int] = (TILE_ROWS, TILE_COLS),
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets`, in float32."""
    return TiledLinearCrossEntropy.apply(hidden.float(), head.weight.float(), targets, *tile)
