"""The visual head as one attention-shaped product, computed in cache-sized tiles (the CPU path).

A patch's soft embedding is `softmax(layer_norm(x W^T)) E`: W `[K, d]` the head's linear map, the layer
norm over the K visual words (scale g, shift b), E `[K, h]` the visual embedding table (VTE). The layer
norm's row statistics need no `[rows, K]` tensor: the mean of `x W^T` is `x . mean(W)` and its variance is
`x^T C x`, C the `d x d` covariance of W's rows. With `s = 1 / sqrt(var + eps)` and `mu = x . mean(W)`:

    layer_norm(x W^T)_v = g_v (x . w_v - mu) s + b_v = [x s, -mu s, 1] . [g_v w_v, g_v, b_v]

so the head is `softmax(q k^T) E` for `q = [x s, -mu s, 1]`, `k = [g w, g, b]`: attention with the patches
as queries, the visual words as keys and the VTE rows as values. `TileSoftmaxProduct` computes it the
way flash attention does (online softmax over column tiles, recomputed in backward from each row's
log-sum-exp): no `[rows, K]` tensor beyond one tile, 7 matrix products per step instead of the checkpointed
chunks' 8, and no layer-norm or softmax pass over 131,072-wide rows in main memory, which is what bounds
the chunked path on a CPU. q and k are ordinary differentiable tensors, so autograd carries the gradient on
to x, W, g and b. Equal to the plain head within float summation order (tests/test_model_memory.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .tiles import TILE_COLS, TILE_ROWS, zero3_partitioned


class TileSoftmaxProduct(torch.autograd.Function):
    """`softmax(q k^T) v` row-wise, a `[tile_rows, tile_cols]` tile of scores at a time (fp32)."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_rows: int, tile_cols: int
    ) -> torch.Tensor:
        n, width = q.shape[0], v.shape[1]
        out = q.new_empty(n, width)
        lse = q.new_empty(n)
        for r0 in range(0, n, tile_rows):
            qr = q[r0 : r0 + tile_rows]
            rows = qr.shape[0]
            best = q.new_full((rows,), float("-inf"))
            total = q.new_zeros(rows)
            acc = q.new_zeros(rows, width)
            for c0 in range(0, k.shape[0], tile_cols):
                scores = qr @ k[c0 : c0 + tile_cols].t()
                new_best = torch.maximum(best, scores.amax(1))
                scale = torch.exp(best - new_best)  # rescales what earlier tiles summed (0 on the first)
                probs = scores.sub_(new_best[:, None]).exp_()
                total = total.mul_(scale).add_(probs.sum(1))
                acc = torch.addmm(acc.mul_(scale[:, None]), probs, v[c0 : c0 + tile_cols])
                best = new_best
            out[r0 : r0 + rows] = acc.div_(total[:, None])
            lse[r0 : r0 + rows] = best + total.log()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tile = (tile_rows, tile_cols)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        tile_rows, tile_cols = ctx.tile
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q) if need_q else None
        dk = torch.zeros_like(k) if need_k else None
        dv = torch.zeros_like(v) if need_v else None
        # rowsum(P * dP) = rowsum(dO * O): the softmax backward's per-row term without a second pass
        delta = (grad_out * out).sum(1, keepdim=True)
        # A column of -lse (-delta) on the rows and of ones on the words puts each tile's subtraction into
        # its matrix product: P = exp([q, -lse] [k, 1]^T), dP - delta = [dO, -delta] [v, 1]^T.
        q_shift = torch.cat([q, -lse[:, None]], 1)
        g_shift = torch.cat([grad_out, -delta], 1)
        k_ones = torch.cat([k, k.new_ones(k.shape[0], 1)], 1)
        v_ones = torch.cat([v, v.new_ones(v.shape[0], 1)], 1)
        for r0 in range(0, q.shape[0], tile_rows):
            qr, gr = q[r0 : r0 + tile_rows], grad_out[r0 : r0 + tile_rows]
            qs, gs = q_shift[r0 : r0 + tile_rows], g_shift[r0 : r0 + tile_rows]
            for c0 in range(0, k.shape[0], tile_cols):
                probs = (qs @ k_ones[c0 : c0 + tile_cols].t()).exp_()
                if dv is not None:
                    dv[c0 : c0 + tile_cols].addmm_(probs.t(), gr)
                if dq is None and dk is None:
                    continue
                dscores = (gs @ v_ones[c0 : c0 + tile_cols].t()).mul_(probs)
                if dq is not None:
                    dq[r0 : r0 + tile_rows].addmm_(dscores, k[c0 : c0 + tile_cols])
                if dk is not None:
                    dk[c0 : c0 + tile_cols].addmm_(dscores.t(), qr)
        return dq, dk, dv, None, None


def fusable(head: nn.Module, tokenize_function: str, features: torch.Tensor) -> bool:
    """Whether the tiled path computes this head: a softmax over a bias-free linear map and a layer norm,
    on a CPU (on a GPU the chunked path's kernels are fast; a ZeRO-3 partitioned weight is gathered only by
    calling its module, which the tiled path does not)."""
    if tokenize_function != "softmax" or features.device.type != "cpu":
        return False
    if not (isinstance(head, nn.Sequential) and len(head) == 2):
        return False
    linear, norm = head
    return (
        isinstance(linear, nn.Linear)
        and linear.bias is None
        and isinstance(norm, nn.LayerNorm)
        and not zero3_partitioned(head)
    )


def tiled_soft_embeddings(
    head: nn.Sequential,
    table: torch.Tensor,
    rows: torch.Tensor,
    tile: tuple[int, int] = (TILE_ROWS, TILE_COLS),
) -> torch.Tensor:
    """`softmax(head(rows)) @ table` for `rows` `[N, d]` and `table` `[K, h]` (K = the head's width), in fp32
    through `TileSoftmaxProduct`; returned in `table`'s dtype."""
    linear, norm = head
    weight = linear.weight.float()
    words = weight.shape[0]
    gain = norm.weight.float() if norm.weight is not None else weight.new_ones(words)
    shift = norm.bias.float() if norm.bias is not None else weight.new_zeros(words)
    x = rows.float()
    mean_row = weight.mean(0)
    centred = weight - mean_row
    covariance = centred.t() @ centred / words  # the layer norm's biased variance, as x^T C x
    mu = x @ mean_row
    inv_std = torch.rsqrt(((x @ covariance) * x).sum(1).clamp_min(0) + norm.eps)
    q = torch.cat([x * inv_std[:, None], (-mu * inv_std)[:, None], x.new_ones(x.shape[0], 1)], 1)
    k = torch.cat([weight * gain[:, None], gain[:, None], shift[:, None]], 1)
    return TileSoftmaxProduct.apply(q, k, table.float(), *tile).to(table.dtype)
