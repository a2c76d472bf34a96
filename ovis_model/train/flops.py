"""Throughput and model FLOPs utilisation (MFU) of each optimizer step.

Model FLOPs of a step (forward and backward, the convention of Kaplan et al., PaLM's appendix B, nanoGPT's
`estimate_mfu` and torchtitan's `get_num_flop_per_token`: 2 FLOPs per multiply-add forward, twice that
backward, so 6 per parameter per token; gradient-checkpointing recomputation not counted, frozen parts
counted as if trained, padding not counted):

    6 * N_llm * T                       the LLM's matmuls on every token the LLM sees (images expanded)
  + 12 * L * H * Q * sum_i s_i ** 2     attention scores and weighted sum: per layer, per packed
                                        sub-sequence of length s_i (attention never crosses sub-samples),
                                        no causal halving (as nanoGPT and PaLM)
  + 6 * N_vit * P * I                   the visual backbone and head on the P patches of each of I images
                                        (its class token and own attention left out: a few % at 576 patches)
  + 6 * N_vte * T_vis                   the visual embedding table (probabilities times a matrix) per
                                        visual token

N_llm: the LLM's parameters without the input embedding table (a lookup, no FLOPs), with the output head
(tied or not); L, H, Q: the LLM's layers, attention heads and head size. MFU = model FLOPs of the step over
(step time x ranks x the device's peak): peak is `train.peak_tflops` when set, else the dense bf16 Tensor
Core peak of a known GPU (`PEAK_TFLOPS`, by the name CUDA reports), else unknown (no MFU: CPUs and fp32
runs have no meaningful tabled peak).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .loss import all_reduce_sum

# Dense (no 2:4 sparsity) bf16 Tensor Core peak per device, TFLOP/s, from the vendors' datasheets; the
# first key found in the device's name wins (more specific names first).
PEAK_TFLOPS: dict[str, float] = {
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A6000": 155.0,
    "RTX 4090": 165.0,
    "MI300X": 1307.0,
    "MI325X": 1307.0,
    "MI250X": 191.5,
}


def device_peak_tflops(device: torch.device, override: float = 0.0, bf16: bool = True) -> float | None:
    """The peak to divide by: the override, else the table's entry for this CUDA device in bf16."""
    if override > 0:
        return float(override)
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@dataclass(frozen=True)
class FlopsModel:
    """The model's sizes that its FLOPs per step depend on (see the module doc)."""

    llm_params: int
    layers: int
    heads: int
    head_dim: int
    vit_params: int
    patches_per_image: int
    vte_params: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlopsModel:
        def size(params: Sequence[torch.nn.Parameter] | object) -> int:
            return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)  # full sizes under ZeRO-3

        llm = model.llm
        embed = llm.get_input_embeddings().weight
        head = llm.get_output_embeddings()
        tied = head is not None and head.weight is embed
        n_llm = size(llm.parameters()) - size([embed]) + (size([embed]) if tied else 0)
        cfg = llm.config
        text = getattr(cfg, "text_config", cfg)
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        vt = model.visual_tokenizer
        return cls(
            llm_params=n_llm,
            layers=int(text.num_hidden_layers),
            heads=heads,
            head_dim=head_dim,
            vit_params=size(vt.parameters()),
            patches_per_image=int(vt.config.num_patches),
            vte_params=size(model.vte.parameters()),
        )

    def step_flops(self, tokens: int, sq_lengths: int, images: int, visual_tokens: int) -> float:
        return (
            6.0 * self.llm_params * tokens
            + 12.0 * self.layers * self.heads * self.head_dim * sq_lengths
            + 6.0 * self.vit_params * self.patches_per_image * images
            + 6.0 * self.vte_params * visual_tokens
        )


class Throughput:
    """Per step: tokens/s of the step and, where the device's peak is known, MFU (all ranks together)."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, world: int, peak_override: float, bf16: bool
    ) -> None:
        self.flops = FlopsModel.of(model)
        self.visual_tokens = int(model.num_visual_tokens)
        self.device, self.world = device, world
        self.peak = device_peak_tflops(device, peak_override, bf16)

    def values(self, batches: Sequence[dict], seconds: float) -> dict[str, float]:
        """From one step's micro-batches (this rank's, summed over ranks here) and its wall time."""
        tokens = sq = images = 0
        for mb in batches:
            tokens += int(mb["meta"]["tokens"])
            images += int(mb["meta"]["images"])
            cu = mb["inputs"]["cu_seqlens"].detach().to("cpu", torch.int64)
            sq += int((cu[1:] - cu[:-1]).pow(2).sum())
        tokens, sq, images = all_reduce_sum([tokens, sq, images], self.device)
        flops = self.flops.step_flops(tokens, sq, images, images * self.visual_tokens)
        seconds = max(seconds, 1e-9)
        out = {"step_tokens_per_s": tokens / seconds, "tflops_per_rank": flops / seconds / self.world / 1e12}
        if self.peak:
            out["mfu"] = flops / seconds / (self.world * self.peak * 1e12)
        return out
