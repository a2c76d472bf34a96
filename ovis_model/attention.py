"""Attention inputs for packed sequences: several sub-samples per row, none attending across a boundary.

A row is described by `segment_ids` (which sub-sample each token belongs to; padding is one more segment
of its own, so no query row is ever fully masked) and `position_ids` (restarting at 0 in each segment).
From them each attention implementation gets what it needs:

- sdpa_segments (the CPU default): the segments' bounds; `ovis_model.segment_attention` runs SDPA on each
  segment (short neighbours grouped), so memory follows the sum of the segments' squares, never L²;
- flex_attention (the CUDA default without flash-attn): a `BlockMask` built from the segments' bounds at
  block granularity (no L x L tensor), the masked blocks skipped by the kernel;
- flash_attention_2/3 (varlen, the default where flash-attn is installed): `cu_seq_lens_*` /
  `max_length_*` over the flattened batch, no mask;
- sdpa: a dense 4D boolean block-diagonal causal mask (True = attend), returned as-is by transformers' mask
  code: memory and compute grow with L² (kept as the reference the others are tested against);
- eager: the same dense mask as an additive float mask.
"""

from __future__ import annotations

from typing import Any

import torch

from .segment_attention import SEGMENT_ATTENTION, no_mask, segment_windows

VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")
# flex attention's tile; its micro-batches are padded to FLEX_PAD_MULTIPLE tokens (a multiple of the tile) so
# that the compiled kernel sees few distinct lengths (each new one may recompile)
FLEX_BLOCK = 128
FLEX_PAD_MULTIPLE = 512


def default_attn_implementation(device_type: str | None = None, packed: bool = True) -> str:
    """For packed training, the fastest implementation that never builds an L x L mask: varlen flash
    attention where flash-attn is installed with a GPU, flex attention on other GPUs, per-segment SDPA on
    CPU. For one sequence at a time (`packed=False`: chat, generation) flash attention where installed,
    else SDPA (causal, no mask to build)."""
    import importlib.util

    cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if not packed:
        return "sdpa"
    return "flex_attention" if cuda else SEGMENT_ATTENTION


def pad_multiple(attn_implementation: str | None) -> int | None:
    """The length a micro-batch is padded to a multiple of, for this implementation (None: no padding)."""
    return FLEX_PAD_MULTIPLE if attn_implementation == "flex_attention" else None


def log_recompiles() -> None:
    """Have torch.compile log each recompilation and its reason (flex attention compiles per shape)."""
    torch._logging.set_logs(recompiles=True)


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


def flex_block_mask(segment_ids: torch.Tensor, block: int = FLEX_BLOCK) -> Any:
    """A flex-attention `BlockMask` for the block-diagonal causal pattern, built at tile granularity.

    Segment ids never decrease along a row (sub-samples are laid out one after another), so a tile pair
    (query tile i, key tile j <= i) holds a visible entry iff the key tile's last segment reaches the query
    tile's first one, and is "full" (no mask_mod needed) iff both tiles lie in one segment and j < i. Only
    `[B, L/block, L/block]` booleans are built, never `create_block_mask`'s dense `[B, L, L]` evaluation.
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, length = segment_ids.shape
    n = -(-length // block)
    # the last partial tile is padded with one more segment id (never visible to the real tokens)
    seg = torch.nn.functional.pad(segment_ids, (0, n * block - length), value=int(segment_ids.max()) + 1)
    tiles = seg.view(batch, n, block)
    first, last = tiles[..., 0], tiles[..., -1]
    idx = torch.arange(n, device=seg.device)
    lower = idx[None, :, None] >= idx[None, None, :]  # key tile j <= query tile i
    visible = lower & (last[:, None, :] >= first[:, :, None])
    whole = (first == last) & (length - idx * block >= block)  # tile inside one segment, not the padded one
    full = (
        (idx[None, :, None] > idx[None, None, :])
        & whole[:, :, None]
        & whole[:, None, :]
        & (first[:, :, None] == first[:, None, :])
    )
    partial = visible & ~full

    def indices(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = pattern.sum(-1, dtype=torch.int32)[:, None]  # [B, 1 head, n]
        # visible tiles first, in ascending order (a stable sort of the negated pattern)
        order = torch.sort((~pattern).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return counts, order[:, None]

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)

    def document_causal(b, h, q_idx, kv_idx):  # noqa: ANN001 (flex's mask_mod signature)
        return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)

    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block,
        mask_mod=document_causal,
        seq_lengths=(length, length),
    )


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
    if impl == SEGMENT_ATTENTION:
        return {
            "attention_mask": no_mask(segment_ids.shape[0], segment_ids.device),
            "segment_windows": segment_windows(segment_ids),
        }
    if impl == "flex_attention":
        kwargs: dict[str, Any] = {"attention_mask": flex_block_mask(segment_ids)}
        if segment_ids.is_cuda:
            # Inductor picks its decoding kernel for short queries, which found no valid config on an H200
            # (torch 2.11): force the training kernel, right for packed sequences anyway.
            kwargs["kernel_options"] = {"FORCE_USE_FLEX_ATTENTION": True}
        return kwargs
    mask = block_causal_mask(segment_ids)
    if impl == "eager":
        return {"attention_mask": additive_mask(mask, dtype)}
    return {"attention_mask": mask}
