"""Memory: each step's peak (device memory on a GPU, resident memory on CPU) and, before the first step, an
estimate of what one micro-batch needs, so that a budget that cannot fit stops with one line instead of
the kernel's OOM killer.

The estimate (`estimate_bytes`) adds, for a micro-batch of T tokens: the trained parameters' gradients and
AdamW states (divided among ranks under ZeRO), the LLM's saved activations (per token and layer, or one
layer's input per token and layer under gradient checkpointing), the ViT's for the most images T tokens can
hold, the chunks of the LM loss and of the visual head (`ovis_model.chunked`), and, for the dense-mask
attention implementations (sdpa, eager), the `[L, L]` mask and scores. It is an upper bound in spirit, built
from the model's dimensions; docs/performance.md compares it with measured peaks.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import is_varlen
from ..chunked import CHUNK_ELEMENTS
from ..segment_attention import SEGMENT_ATTENTION, WINDOW

GIB = 1024**3


# -- measuring -----------------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or the process's peak resident set (Linux clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak then runs from the start
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> int:
    """Peak since `reset_peak`: CUDA memory allocated by tensors, or the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


def available_bytes(device: torch.device) -> int:
    """Memory this process can still take: free device memory plus the allocator's cache on a GPU;
    MemAvailable, capped by the cgroup's limit, on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = int(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    if available is None:  # unknown: never refuse on a guess
        return 1 << 62
    return available


# -- estimating ----------------------------------------------------------------------------------------------
@dataclass
class Shapes:
    """What the estimate needs of a model (read from its config: no parameter is touched)."""

    d_model: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    d_vit: int
    vit_intermediate: int
    vit_layers: int
    vit_heads: int
    patches: int  # ViT tokens per image
    visual_words: int
    visual_tokens: int  # per image in the LLM's sequence
    image_size: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> Shapes:
        llm = model.config.llm_config
        vt = model.config.visual_tokenizer_config
        vit = vt.backbone_config
        return cls(
            d_model=llm.hidden_size,
            intermediate=getattr(llm, "intermediate_size", 4 * llm.hidden_size),
            layers=llm.num_hidden_layers,
            heads=llm.num_attention_heads,
            vocab=llm.vocab_size,
            d_vit=vit.hidden_size,
            vit_intermediate=getattr(vit, "intermediate_size", 4 * vit.hidden_size),
            vit_layers=vit.num_hidden_layers,
            vit_heads=vit.num_attention_heads,
            patches=(vit.image_size // vit.patch_size) ** 2 + 1,
            visual_words=vt.vocab_size,
            visual_tokens=model.num_visual_tokens,
            image_size=vit.image_size,
        )


def estimate_bytes(
    shapes: Shapes,
    tokens: int,
    *,
    trained_parameters: int,
    attn_implementation: str | None,
    dtype_bytes: int = 4,
    gradient_checkpointing: bool = False,
    world_size: int = 1,
    zero_stage: int = 2,
    capacity: int | None = None,
) -> dict[str, int]:
    """Bytes one micro-batch of `tokens` adds beyond the loaded weights, by part (see the module doc)."""
    s, b = shapes, dtype_bytes
    states = 4 * 2 + (4 if b != 4 else 0)  # AdamW's two fp32 moments, plus fp32 master weights under bf16
    shard = max(world_size, 1) if zero_stage >= 1 else 1
    grads = b * trained_parameters // (max(world_size, 1) if zero_stage >= 2 else 1)
    out = {"optimizer": states * trained_parameters // shard + grads}
    # LLM: ~10 d-wide and 4 intermediate-wide tensors saved per token and layer (norms, q/k/v/o, MLP)
    per_layer_token = (10 * s.d_model + 4 * s.intermediate) * b
    if gradient_checkpointing:
        out["llm_activations"] = tokens * (s.layers * s.d_model * b + per_layer_token)
    else:
        out["llm_activations"] = tokens * s.layers * per_layer_token
    images = tokens // max(s.visual_tokens, 1)
    vit_layer_token = (10 * s.d_vit + 4 * s.vit_intermediate) * b
    vit_layers = 1 if gradient_checkpointing else s.vit_layers
    out["vit_activations"] = images * s.patches * (vit_layer_token * vit_layers + s.vit_heads * s.patches * 4)
    out["images"] = images * 3 * s.image_size**2 * (4 + 1)  # normalised pixels and their uint8 canvases
    # the chunked visual head and LM loss: a few [rows, vocabulary] float32 tensors of one chunk at a time
    chunk = min(CHUNK_ELEMENTS, images * s.patches * s.visual_words)
    out["visual_head"] = 5 * 4 * chunk + images * s.patches * (s.d_model + s.d_vit) * 4 * 2
    out["lm_loss"] = 3 * 4 * min(CHUNK_ELEMENTS, tokens * s.vocab)
    impl = attn_implementation or "sdpa"
    if impl in ("sdpa", "eager"):  # the dense [L, L] mask, and the scores and weights kept per layer
        out["attention"] = tokens**2 + s.layers * s.heads * tokens**2 * 4 * 2
    elif impl == SEGMENT_ATTENTION:  # one window at a time; windows span at most a segment or WINDOW tokens
        span = max(capacity or WINDOW, WINDOW)
        out["attention"] = s.heads * span**2 * 4 * 2
    elif is_varlen(impl) or impl == "flex_attention":
        out["attention"] = s.layers * s.heads * tokens * 4  # log-sum-exp rows
    out["workspace"] = 4 * tokens * max(s.d_model, s.intermediate) * 4  # temporaries of the widest op
    return out


def largest_fitting(fits: callable, upper: int, lower: int = 256) -> int | None:  # type: ignore[valid-type]
    """The largest multiple of 256 in [lower, upper] for which `fits(tokens)` holds (None: not even lower)."""
    if not fits(lower):
        return None
    lo, hi = lower // 256, max(upper // 256, lower // 256)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * 256) else (lo, mid - 1)
    return lo * 256


def check_fits(
    model: torch.nn.Module,
    tokens: int,
    device: torch.device,
    *,
    dtype_bytes: int,
    gradient_checkpointing: bool,
    world_size: int,
    zero_stage: int,
    capacity: int | None,
) -> str | None:
    """None when a micro-batch of `tokens` fits in what this process can still take; else one line."""
    shapes = Shapes.of(model)
    trained = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    kwargs = dict(
        trained_parameters=trained, attn_implementation=model.attn_implementation, dtype_bytes=dtype_bytes,
        gradient_checkpointing=gradient_checkpointing, world_size=world_size, zero_stage=zero_stage,
        capacity=capacity,
    )  # fmt: skip
    available = available_bytes(device)
    if os.environ.get("OVIS_TRAIN_AVAILABLE_BYTES"):  # what a smaller machine would have (tests, planning)
        available = int(os.environ["OVIS_TRAIN_AVAILABLE_BYTES"])
    parts = estimate_bytes(shapes, tokens, **kwargs)
    need = sum(parts.values())
    if need <= available:
        return None
    biggest = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
    fitting = largest_fitting(
        lambda t: sum(estimate_bytes(shapes, t, **kwargs).values()) <= available, tokens
    )
    advice = (
        f"lower --micro-batch-tokens to {fitting:,} or less"
        if fitting
        else "even 256 tokens do not fit: free memory or use more ranks (ZeRO)"
    )
    where = "GPU memory" if device.type == "cuda" else "memory"
    return (
        f"a micro-batch of {tokens:,} tokens needs about {need / GIB:.1f} GiB beyond the loaded model ("
        + ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in biggest)
        + f"), but only {available / GIB:.1f} GiB of {where} is available: {advice}"
        f" (attention: {model.attn_implementation})"
    )
