"""Per-segment attention for packed micro-batches: SDPA over each sub-sample, never an L x L mask.

Registered with transformers as the attention implementation `sdpa_segments` (the CPU default, see
`ovis_model.attention`) by `register()`, which `ovis_model.modeling` calls on import: this module does not
import transformers itself, so the loader's workers, which collate through `ovis_model.batching`, start
without it (~3 s of imports per worker). The LLM's forward receives `segment_windows` (a keyword
transformers passes through to the attention function): per row, the spans `(start, end, mask)` that
attention stays inside. A window is one segment, causal, with no mask at all; or a run of consecutive short
segments, grouped so that a micro-batch of many tiny sub-samples does not cost one kernel call each, with a
small `[w, w]` block-causal mask. Memory then follows the sum of the windows' squares (at most WINDOW² per
window beyond the longest segment's), where a dense mask follows the micro-batch's square.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SEGMENT_ATTENTION = "sdpa_segments"
# consecutive segments shorter than this are grouped into windows of at most this many tokens
WINDOW = 512

Window = tuple[int, int, torch.Tensor | None]


def segment_windows(segment_ids: torch.Tensor, window: int = WINDOW) -> list[list[Window]]:
    """Per row of `segment_ids` `[B, L]`, the attention windows `(start, end, mask or None)` covering it."""
    out = []
    for row in segment_ids:
        lengths = torch.unique_consecutive(row, return_counts=True)[1].tolist()
        spans: list[list[int]] = []  # each: lengths of the segments grouped into one window
        for n in lengths:
            if spans and sum(spans[-1]) + n <= window:
                spans[-1].append(n)
            else:
                spans.append([n])
        windows: list[Window] = []
        start = 0
        for group in spans:
            end = start + sum(group)
            windows.append((start, end, None if len(group) == 1 else _group_mask(group, row.device)))
            start = end
        out.append(windows)
    return out


def _group_mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    """`[w, w]` bool, True = attend: causal inside each of the grouped segments."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=device).tril()
    return (ids[:, None] == ids[None, :]) & causal


def segment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_windows: list[list[Window]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q `[B, H, L, D]`, k/v `[B, Hkv, L, D]` ->
    `([B, L, H, D], None)`. Without `segment_windows` (e.g. generation) it is plain causal SDPA."""
    gqa = key.shape[1] != query.shape[1]
    if segment_windows is None:  # SDPA as transformers runs it (its mask from `sdpa_mask`)
        causal = attention_mask is None and query.shape[2] > 1
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=causal, enable_gqa=gqa,
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    rows = []
    for b, windows in enumerate(segment_windows):
        parts = []
        for start, end, mask in windows:
            q, k, v = (t[b : b + 1, :, start:end] for t in (query, key, value))
            parts.append(
                F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    dropout_p=dropout,
                    scale=scaling,
                    is_causal=mask is None,
                    enable_gqa=gqa,
                )  # fmt: skip
            )
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def no_mask(batch: int, device: torch.device) -> torch.Tensor:
    """The `attention_mask` passed beside `segment_windows`: an empty 4D tensor, which transformers' mask
    code returns as-is (a 4D mask is taken as prepared) instead of building one from the restarting
    position ids; the attention function ignores it when windows are given."""
    return torch.ones(batch, 1, 0, 0, dtype=torch.bool, device=device)


def register() -> None:
    """Make `sdpa_segments` a valid `attn_implementation` for transformers' models (idempotent). Without
    windows (generation) its masks are SDPA's, so padded batches stay correct."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention_forward)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
