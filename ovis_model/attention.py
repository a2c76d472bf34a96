"""Attention inputs for packed sequences: several sub-samples per row, none attending across a boundary.

A row is described by `segment_ids` (which sub-sample each token belongs to; padding is one more segment
of its own, so no query row is ever fully masked) and `position_ids` (restarting at 0 in each segment).
From them each attention implementation gets what it needs:

- sdpa:  a 4D boolean block-diagonal causal mask (True = attend), returned as-is by transformers' mask code;
- eager: the same mask as an additive float mask;
- flex_attention: a `BlockMask` over the flattened document ids;
- flash_attention_2/3 (varlen): `cu_seq_lens_*` / `max_length_*` over the flattened batch, no mask.
"""

from __future__ import annotations

from typing import Any

import torch

VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def default_attn_implementation() -> str:
    """Varlen flash attention where flash-attn is installed with a GPU, else SDPA with a block mask."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"


def is_varlen(attn_implementation: str | None) -> bool:
    return bool(attn_implementation) and (
        attn_implementation in VARLEN_IMPLEMENTATIONS or "flash" in attn_implementation
    )


def positions_from_lengths(
    lengths: list[int] | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """Position ids restarting at each segment, e.g. lengths [2, 3] -> [0, 1, 0, 1, 2]."""
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    total = int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total, device=device) - torch.repeat_interleave(starts, lengths)


def cu_seqlens_from_lengths(
    lengths: list[int] | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """int32 cumulative lengths with a leading 0, the varlen flash-attention format."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """`[B, 1, L, L]` bool: query i sees key j iff j <= i and both are in the same segment."""
    length = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> float mask with 0 where attended and the dtype's minimum elsewhere (eager attention)."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)


def flex_block_mask(segment_ids: torch.Tensor) -> Any:
    """A flex-attention `BlockMask` for the block-diagonal causal pattern (masked blocks are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = segment_ids.shape

    def document_causal(b, h, q_idx, kv_idx):  # noqa: ANN001 (flex's mask_mod signature)
        return (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (kv_idx <= q_idx)

    return create_block_mask(document_causal, batch, None, length, length, device=segment_ids.device)


def flat_lengths(segment_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of equal segment ids over the flattened `[B * L]` batch (rows never merge)."""
    batch, length = segment_ids.shape
    # offset each row so that segment k of row b never equals a segment of another row
    flat = (segment_ids + torch.arange(batch, device=segment_ids.device)[:, None] * (length + 1)).reshape(-1)
    return torch.unique_consecutive(flat, return_counts=True)[1]


def llm_attention_kwargs(
    attn_implementation: str | None,
    segment_ids: torch.Tensor | None,
    dtype: torch.dtype,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the LLM's forward so that attention stays inside each segment.

    `segment_ids=None` means one sequence per row (plain causal attention, transformers' default).
    """
    if segment_ids is None:
        return {}
    impl = attn_implementation or "sdpa"
    if is_varlen(impl):
        if cu_seqlens is None:
            lengths = flat_lengths(segment_ids)
            cu_seqlens = cu_seqlens_from_lengths(lengths, device=segment_ids.device)
            max_seqlen = int(lengths.max())
        elif max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu_seqlens = cu_seqlens.to(device=segment_ids.device, dtype=torch.int32)
        return {
            "attention_mask": None,
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": max_seqlen,
            "max_length_k": max_seqlen,
        }
    if impl == "flex_attention":
        # Inductor picks its decoding kernel for short queries, which found no valid config on an H200
        # (torch 2.11): force the training kernel, right for packed sequences anyway.
        return {
            "attention_mask": flex_block_mask(segment_ids),
            "kernel_options": {"FORCE_USE_FLEX_ATTENTION": True},
        }
    mask = block_causal_mask(segment_ids)
    if impl == "eager":
        return {"attention_mask": additive_mask(mask, dtype)}
    return {"attention_mask": mask}
