"""GPU check of ovis_model: packed-sequence equivalence in bf16, and packed vs padded throughput.

Run from the repository root on a GPU machine (torch + transformers; no flash-attn or DeepSpeed needed):

    python3 benchmarks/gpu_model_check.py            # the real check, under 5 minutes on one H100
    python3 benchmarks/gpu_model_check.py --smoke    # tiny models, CPU, fp32: checks the script's logic

Part 1 runs every sub-sample of a packed sequence alone and compares its logits and loss with its slice of
the packed run, for each attention path (sdpa with a block-diagonal mask; flex_attention where it works),
in bf16 and fp32. bf16 packed-vs-alone differences are set beside bf16-vs-fp32 differences of the same
sub-samples, the scale of bf16 noise. Part 2 times forward+backward of a Qwen2-0.5B-shaped LLM with a
CLIP-L/14-336 visual tokenizer (random weights) on the same synthetic samples, packed into 4096-token
sequences versus padded in batches of 8 to the longest (as the original did), and prints tokens/s.
Results go to $OUT/gpu_model_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import CLIPVisionConfig, Qwen2Config  # noqa: E402

from ovis_model.batching import collate_packed  # noqa: E402
from ovis_model.configuration import OvisConfig, VisualTokenizerConfig  # noqa: E402
from ovis_model.modeling import Ovis, shift_targets  # noqa: E402
from ovis_model.tiny import random_packed_record, split_record  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def build(
    llm: dict, vit: dict, vocab: int, device: str, dtype: torch.dtype, attn: str, seed: int = 0
) -> Ovis:
    torch.manual_seed(seed)
    config = OvisConfig(
        llm_config=Qwen2Config(**llm),
        visual_tokenizer_config=VisualTokenizerConfig(
            backbone_config=CLIPVisionConfig(**vit), vocab_size=vocab
        ),
        conversation_template="qwen",
    )
    with torch.device(device):
        model = Ovis(config)
    model.set_llm_attention(attn)
    return model.to(dtype).eval()


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype if k == "pixel_values" else None)
        out[k] = v
    return out


def segment_losses(logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor) -> list[float]:
    """Loss sum of each sub-sample of one row, from packed logits."""
    targets = shift_targets(labels, segments)[0]
    ce = F.cross_entropy(logits[0].float(), targets.clamp(min=0), reduction="none") * (targets != -100)
    return [float(ce[segments[0] == s].sum()) for s in segments[0].unique().tolist()]


# -- part 1: equivalence ----------------------------------------------------------------------------------
def equivalence(device: str, smoke: bool) -> dict:
    if smoke:
        llm = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)  # fmt: skip
        vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=28, patch_size=14)  # fmt: skip
        vocab, specs = 64, [(11, 1), (7, 0), (13, 2), (5, 0)]
    else:
        llm = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=32000, max_position_embeddings=8192)  # fmt: skip
        vit = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   image_size=112, patch_size=14)  # fmt: skip
        vocab, specs = 4096, [(300, 1), (120, 0), (700, 2), (64, 0), (410, 1), (250, 0)]
    rng = np.random.default_rng(0)
    record = random_packed_record(rng, specs, vocab_size=llm["vocab_size"], image_side=vit["image_size"])
    subs = split_record(record)
    # fp32 sdpa first: its alone logits are the reference for the bf16 noise scale; same weights cast to bf16
    runs = [("sdpa", torch.float32), ("eager", torch.float32)] if smoke else [
        ("sdpa", torch.float32), ("sdpa", torch.bfloat16), ("flex_attention", torch.bfloat16)]  # fmt: skip
    results: dict = {"sub_samples": specs}
    alone_fp32: dict[int, torch.Tensor] = {}
    model = build(llm, vit, vocab, device, torch.float32, "sdpa")
    for attn, dtype in runs:
        key = f"{attn}/{str(dtype).removeprefix('torch.')}"
        try:
            model.to(dtype)
            model.set_llm_attention(attn)
            packed = to_device(collate_packed([record], model.image_processor, model.num_visual_tokens,
                                              layout="concat"), device, dtype)  # fmt: skip
            with torch.no_grad():
                out = model(**packed, return_logits=True)
            seg = packed["segment_ids"]
            packed_losses = segment_losses(out.logits, packed["labels"], seg)
            rows = []
            for i, sub in enumerate(subs):
                alone = to_device(collate_packed([sub], model.image_processor, model.num_visual_tokens),
                                  device, dtype)  # fmt: skip
                with torch.no_grad():
                    ref = model(**alone, return_logits=True)
                ref_logits = ref.logits[0].float()
                packed_logits = out.logits[0][seg[0] == i].float()
                row = {
                    "max_abs_logit_diff_packed_vs_alone": float((packed_logits - ref_logits).abs().max()),
                    "loss_packed": packed_losses[i] / max(int(ref.n_tokens), 1),
                    "loss_alone": float(ref.loss),
                }
                row["loss_diff"] = abs(row["loss_packed"] - row["loss_alone"])
                if dtype == torch.float32 and attn == "sdpa":
                    alone_fp32[i] = ref_logits
                elif dtype != torch.float32 and i in alone_fp32:  # the scale of bf16 noise, same sub-sample
                    row["max_abs_logit_diff_alone_vs_fp32"] = float((ref_logits - alone_fp32[i]).abs().max())
                rows.append(row)
            results[key] = {
                "per_sub_sample": rows,
                "max_abs_logit_diff": max(r["max_abs_logit_diff_packed_vs_alone"] for r in rows),
                "max_loss_diff": max(r["loss_diff"] for r in rows),
                "total_loss_sum_packed": float(out.loss_sum),
            }
            worst, worst_loss = results[key]["max_abs_logit_diff"], results[key]["max_loss_diff"]
            log(
                f"equivalence {key}: max |logit diff| packed vs alone {worst:.3e}, "
                f"max loss diff {worst_loss:.3e}"
            )
            for i, r in enumerate(rows):
                extra = r.get("max_abs_logit_diff_alone_vs_fp32")
                noise = f"; bf16-alone-vs-fp32-alone {extra:.3e}" if extra is not None else ""
                pa, al, d = r["loss_packed"], r["loss_alone"], r["loss_diff"]
                losses = f"loss packed {pa:.6f} alone {al:.6f} diff {d:.2e}"
                log(
                    f"    sub {i} {specs[i]}: logits {r['max_abs_logit_diff_packed_vs_alone']:.3e}, "
                    f"{losses}{noise}"
                )
        except Exception as e:  # flex may be unavailable: report and go on
            results[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"equivalence {key}: FAILED {results[key]['error']}")
            traceback.print_exc()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


# -- part 2: throughput -----------------------------------------------------------------------------------
def make_samples(
    rng: np.random.Generator, n: int, vocab: int, side: int, text_range: tuple[int, int]
) -> list:
    """Stage-3-like samples: 85% with one image, text lengths uniform in text_range."""
    out = []
    for _ in range(n):
        n_img = int(rng.random() < 0.85)
        out.append(
            random_packed_record(rng, [(int(rng.integers(*text_range)), n_img)], vocab, image_side=side)
        )
    return out


def expanded_length(rec: dict, n_vis: int) -> int:
    k = len(rec["images"])
    return len(rec["input_ids"]) - k + k * n_vis


def pack(samples: list, capacity: int, n_vis: int) -> list:
    """First-fit decreasing into packed records of at most `capacity` expanded tokens."""
    bins: list[tuple[int, list]] = []
    for rec in sorted(samples, key=lambda r: -expanded_length(r, n_vis)):
        n = expanded_length(rec, n_vis)
        for i, (used, items) in enumerate(bins):
            if used + n <= capacity:
                bins[i] = (used + n, [*items, rec])
                break
        else:
            bins.append((n, [rec]))
    return [
        {
            "input_ids": np.concatenate([r["input_ids"] for r in items]),
            "labels": np.concatenate([r["labels"] for r in items]),
            "lengths": np.concatenate([r["lengths"] for r in items]),
            "images": [im for r in items for im in r["images"]],
        }
        for _, items in bins
    ]


def time_batches(model: Ovis, batches: list, device: str, dtype: torch.dtype, warmup: int = 1) -> float:
    model.train()
    for b in batches[:warmup]:
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(device: str, smoke: bool, visual_vocab: int, n_samples: int, budget_s: float) -> dict:
    if smoke:
        llm = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)  # fmt: skip
        vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=28, patch_size=14)  # fmt: skip
        visual_vocab, capacity, text_range, dtype = 64, 256, (20, 120), torch.float32
    else:  # Qwen2-0.5B shapes, CLIP ViT-L/14-336
        llm = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                   tie_word_embeddings=True, rope_theta=1000000.0)  # fmt: skip
        vit = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
        capacity, text_range, dtype = 4096, (60, 900), torch.bfloat16
    model = build(llm, vit, visual_vocab, device, dtype, "sdpa", seed=1)
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = model.num_visual_tokens
    log(
        f"throughput model: {n_params / 1e6:.0f}M parameters, visual vocab {visual_vocab}, "
        f"{n_vis} visual tokens per image"
    )
    rng = np.random.default_rng(1)
    samples = make_samples(rng, n_samples, llm["vocab_size"], vit["image_size"], text_range)
    real_tokens = sum(expanded_length(s, n_vis) for s in samples)
    proc = model.image_processor
    padded = [
        to_device(collate_packed(samples[i : i + 8], proc, n_vis, layout="rows"), device, dtype)
        for i in range(0, len(samples), 8)
    ]
    packs = pack(samples, capacity, n_vis)
    packed = [to_device(collate_packed([p], proc, n_vis, layout="concat"), device, dtype) for p in packs]
    # flex_attention compiles per shape: give it capacity-padded rows (the padding is its own segment)
    packed_fixed = [
        to_device(
            collate_packed([p], proc, n_vis, layout="concat", pad_to_multiple_of=capacity), device, dtype
        )
        for p in packs
    ]
    padded_slots = sum(b["input_ids"].numel() for b in padded)
    packed_slots = sum(b["input_ids"].numel() for b in packed)
    result: dict = {
        "samples": n_samples,
        "real_tokens": real_tokens,
        "padded": {"batches": len(padded), "token_slots": padded_slots, "fill": real_tokens / padded_slots},
        "packed": {
            "sequences": len(packed),
            "token_slots": packed_slots,
            "fill_of_capacity": real_tokens / (len(packed) * capacity),
        },
        "parameters": n_params,
    }
    log(f"{n_samples} samples, {real_tokens} real tokens; padded: {len(padded)} batches of 8, fill "
        f"{result['padded']['fill']:.2%}; packed: {len(packed)} x {capacity}, "
        f"fill {result['packed']['fill_of_capacity']:.2%}")  # fmt: skip
    runs = [("padded_sdpa", padded, "sdpa"), ("packed_sdpa", packed, "sdpa")]
    # smoke: the capacity-padded path with eager attention (flex compiles for minutes on a small CPU)
    runs.append(("packed_flex_attention", packed_fixed, "flex_attention") if not smoke else
                ("packed_capacity_padded_eager", packed_fixed, "eager"))  # fmt: skip
    for name, batches, attn in runs:
        if time.perf_counter() - T0 > budget_s:
            result[name] = {"skipped": "time budget"}
            log(f"{name}: skipped (time budget)")
            continue
        try:
            model.set_llm_attention(attn)
            seconds = time_batches(model, batches, device, dtype)
            result[name] = {"seconds": seconds, "real_tokens_per_s": real_tokens / seconds}
            if device == "cuda":
                result[name]["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            log(f"{name}: {seconds:.2f}s fwd+bwd, {real_tokens / seconds:,.0f} real tokens/s")
        except Exception as e:
            result[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"{name}: FAILED {result[name]['error']}")
            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()
    base = result.get("padded_sdpa", {}).get("real_tokens_per_s")
    for name in ("packed_sdpa", "packed_flex_attention"):
        if base and "real_tokens_per_s" in result.get(name, {}):
            result[name]["speedup_vs_padded"] = result[name]["real_tokens_per_s"] / base
            log(f"{name} / padded_sdpa throughput ratio: {result[name]['speedup_vs_padded']:.2f}x")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models, CPU, fp32")
    parser.add_argument("--visual-vocab", type=int, default=131072, help="V of the 0.5B throughput model")
    parser.add_argument("--samples", type=int, default=96, help="samples in the throughput comparison")
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip remaining timings after this")
    parser.add_argument("--skip-equivalence", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    import transformers

    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "smoke": args.smoke,
    }
    log(f"device {report['device']}, torch {torch.__version__}, transformers {transformers.__version__}")
    if not args.skip_equivalence:
        report["equivalence"] = equivalence(device, args.smoke)
    n = 16 if args.smoke else args.samples
    report["throughput"] = throughput(device, args.smoke, args.visual_vocab, n, args.budget_s)
    report["wall_s"] = time.perf_counter() - T0
    print(json.dumps(report, indent=2, default=str))
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_model_check.json"
        path.write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
