"""Peak memory and time of one stage-1 training step on CPU: today's dense path beside the new one.

    python benchmarks/train_memory.py                       # 4,096 / 16,384 / 32,768 tokens
    python benchmarks/train_memory.py --tokens 4096 --visual-vocab 131072

Model: the demo's parts (`ovis_model.tiny.write_tiny_parts`: a 2-layer, 32-wide Qwen2-shaped LLM with the
real Qwen2.5 tokenizer's 151,665-word vocabulary, a 2-block, 32-wide CLIP ViT at 336 px: 578 visual tokens
per image), joined by `Ovis.from_parts` with `--visual-vocab` visual words (the recipe's 131,072 by default)
and the stage-1 recipe's trainable parts. Data: stage-1-like sub-samples (one 336 px image + a 15-token
caption, ~593 tokens each) packed into one micro-batch of T tokens.

One step = forward, backward and an AdamW step on that micro-batch, in a fresh process per configuration
(its peak resident set, VmHWM after Linux's clear_refs reset, is the step's alone; "peak" below is the
process's peak minus its resident set just before the step, i.e. what the step adds).

- dense: attention "sdpa" with the `[L, L]` block mask, LM loss and visual head unchunked (today's path);
- chunked: attention "sdpa_segments" (per segment), LM loss and visual head in chunks recomputed in
  backward (`--paths dense,chunked,new`; the CPU default before the tiles);
- new: the default: "sdpa_segments", and on a CPU the LM loss and the visual head in cache-sized tiles
  (ovis_model/tiled_loss.py, ovis_model/visual_head.py).

A configuration whose estimate (`ovis_model.train.memory`) exceeds 80% of the available memory is not run
(it would meet the OOM killer): the table shows the estimate instead. Results: the table on stdout and
benchmarks/results/train_memory_DEVICE_vV.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATHS = {
    "dense": {"attn": "sdpa", "chunks": None},
    "chunked": {"attn": "sdpa_segments", "chunks": "default", "tiles": False},
    "new": {"attn": "sdpa_segments", "chunks": "default"},
}
STAGE1_TRAINABLE = ["visual_tokenizer.re_init_layers", "visual_tokenizer.head", "vte"]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> None:
    """One configuration in this process: prints one JSON line."""
    import numpy as np
    import torch

    from ovis_model.batching import batch_to, collate_packed
    from ovis_model.modeling import Ovis
    from ovis_model.tiny import random_packed_record
    from ovis_model.trainable import select_trainable

    torch.manual_seed(0)
    parts = Path(args.parts)
    path = PATHS[args.path]
    model = Ovis.from_parts(
        parts / "llm", parts / "vit", visual_vocab_size=args.visual_vocab, re_init_layers=1,
        attn_implementation=path["attn"],
    )  # fmt: skip
    if path["chunks"] is None:
        model.loss_chunk_elements = model.visual_chunk_elements = None
    model.tiles = path.get("tiles", True)
    select_trainable(model, STAGE1_TRAINABLE)
    cuda = args.device == "cuda"
    model.to(args.device).train()
    per_sample = 16 + model.num_visual_tokens
    n = max(1, args.tokens // per_sample)
    rng = np.random.default_rng(0)
    record = random_packed_record(rng, [(16, 1)] * n, vocab_size=len(model.text_tokenizer), image_side=336)
    batch = collate_packed([record], model.image_processor, model.num_visual_tokens, layout="concat")
    batch.pop("n_supervised")
    batch = batch_to(batch, args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    out = model(**batch)
    out.loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    print(json.dumps({
        "path": args.path, "actual_tokens": int(batch["input_ids"].numel()), "images": n, "seconds": seconds,
        "peak_bytes": peak - before, "process_peak_bytes": peak, "device": args.device,
        "loss": float(out.loss),
    }))  # fmt: skip


def estimate(parts: Path, path: str, tokens: int, visual_vocab: int) -> int:
    import torch
    from transformers import AutoConfig

    from ovis_model.configuration import OvisConfig, VisualTokenizerConfig
    from ovis_model.modeling import Ovis
    from ovis_model.train.memory import Shapes, estimate_bytes

    llm = AutoConfig.from_pretrained(parts / "llm")
    vit = AutoConfig.from_pretrained(parts / "vit")
    config = OvisConfig(
        llm_config=llm,
        visual_tokenizer_config=VisualTokenizerConfig(backbone_config=vit, vocab_size=visual_vocab),
    )
    with torch.device("meta"):
        model = Ovis(config)
    trained = model.vte.weight.numel() + sum(p.numel() for p in model.visual_tokenizer.head.parameters())
    parts_ = estimate_bytes(
        Shapes.of(model), tokens, trained_parameters=trained, attn_implementation=PATHS[path]["attn"],
        capacity=1024,
    )  # fmt: skip
    if PATHS[path]["chunks"] is None:  # the unchunked visual head: ~5 [patches, V] fp32 tensors per image
        images = tokens // model.num_visual_tokens
        parts_["visual_head"] = images * 5 * 4 * 576 * visual_vocab
    return sum(parts_.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384, 32768])
    ap.add_argument("--visual-vocab", type=int, default=131072)
    ap.add_argument("--paths", default="dense,new")
    ap.add_argument("--device", default="cpu", help="cpu (peak resident memory) or cuda (peak allocated)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ovis_train_memory")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--parts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.tokens = args.tokens[0]
        child(args)
        return

    import torch

    from ovis_model.tiny import write_tiny_parts
    from ovis_model.train.memory import available_bytes

    parts = args.work / "parts"
    if not (parts / "llm" / "config.json").is_file():
        write_tiny_parts(parts, image_size=336, initializer_range=0.3)
    rows = []
    for tokens in args.tokens:
        for path in args.paths.split(","):
            est = estimate(parts, path, tokens, args.visual_vocab)
            room = available_bytes(torch.device(args.device))
            row = {"path": path, "tokens": tokens, "estimate_bytes": est}
            if est > 0.8 * room:
                row["skipped"] = f"estimate {est / 2**30:.1f} GiB > 80% of {room / 2**30:.1f} GiB available"
            else:
                cmd = [sys.executable, __file__, "--child", "1", "--parts", str(parts), "--path", path,
                       "--tokens", str(tokens), "--visual-vocab", str(args.visual_vocab),
                       "--device", args.device]  # fmt: skip
                env = {**os.environ, "PYTHONPATH": str(REPO)}
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    row["error"] = p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"]
                else:
                    row.update(json.loads(p.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows, args.visual_vocab))
    name = f"train_memory_{args.device}_v{args.visual_vocab}.json"
    out = Path(os.environ["OUT"]) / name if os.environ.get("OUT") else REPO / "benchmarks" / "results" / name
    out.write_text(json.dumps({"visual_vocab": args.visual_vocab, "rows": rows}, indent=1) + "\n")


def table(rows: list[dict], visual_vocab: int) -> str:
    """One row per size: each path's peak and time, then each other path's ratios against "new"."""

    def cell(r: dict | None) -> tuple[str, str]:
        if r is None:
            return "-", "-"
        if "skipped" in r:
            return f"not run (estimate {r['estimate_bytes'] / 2**30:.1f} GiB)", "-"
        if "error" in r:
            return "failed", "-"
        return f"{r['peak_bytes'] / 2**30:.2f} GiB", f"{r['seconds']:.1f} s"

    paths = list(dict.fromkeys(r["path"] for r in rows))
    others = [p for p in paths if p != "new"]
    head = [f"{p}: {what}" for p in paths for what in ("peak", "time")]
    head += [f"{p}/new: {what}" for p in others for what in ("peak", "time")] if "new" in paths else []
    lines = [
        f"one stage-1 step, visual vocabulary {visual_vocab:,} (peak = resident memory the step adds)",
        "| tokens | " + " | ".join(head) + " |",
        "| ---: |" + " ---: |" * len(head),
    ]
    for tokens in sorted({r["tokens"] for r in rows}):
        by = {r["path"]: r for r in rows if r.get("tokens") == tokens}
        cells = [c for p in paths for c in cell(by.get(p))]
        n = by.get("new")
        for p in others if "new" in paths else []:
            d = by.get(p)
            ratio_p = ratio_t = "-"
            if d and n and "seconds" in d and "seconds" in n:
                ratio_p = f"{d['peak_bytes'] / max(n['peak_bytes'], 1):.1f}x"
                ratio_t = f"{d['seconds'] / n['seconds']:.2f}x"
            elif n and "seconds" in n and d and "skipped" in d:
                ratio_p = f">= {d['estimate_bytes'] / max(n['peak_bytes'], 1):.0f}x (estimate)"
            cells += [ratio_p, ratio_t]
        lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
