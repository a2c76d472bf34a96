"""Real DeepSpeed engines (CPU, gloo): ZeRO-2 and ZeRO-3 on 2 ranks, one rank's micro-batch without image.

The test launches this file with `torchrun --nproc_per_node 2`; each rank runs `worker()`, which trains one
step per case with DeepSpeed and compares the updated weights to a plain single-process PyTorch step on the
union of both ranks' micro-batches, the loss normalised by the global count of supervised tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORLD = 2
LR = 0.5  # SGD: the update is the gradient itself, so a wrong gradient scale would show (Adam's would not)


def _record(seed: int, n_images: int) -> dict:
    """A packed record of two sub-samples; the images all go to the first one."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ids, labels, lengths, images = [], [], [], []
    for k, n_img in enumerate((n_images, 0)):
        tokens = list(rng.integers(1, 256, 9 + 3 * k))
        for j in range(n_img):
            tokens.insert(1 + 2 * j, -200)
        t = np.array(tokens, dtype=np.int32)
        lab = np.where((np.arange(len(t)) >= len(t) // 2) & (t != -200), t, -100).astype(np.int32)
        ids.append(t)
        labels.append(lab)
        lengths.append(len(t))
        images += [
            Image.fromarray(rng.integers(0, 256, (20 + 5 * j, 28, 3), dtype=np.uint8)) for j in range(n_img)
        ]
    return {
        "input_ids": np.concatenate(ids),
        "labels": np.concatenate(labels),
        "lengths": np.array(lengths, dtype=np.int32),
        "images": images,
    }


# (case name, ZeRO stage, trainable modules, images per rank for each of two steps)
# Expected ViT forwards per rank over the two steps: step 1 runs it on both ranks (rank 1 on a stand-in, to
# keep the collectives in step); in step 2 (no images anywhere) it runs only where needed: not under ZeRO-2
# when the LLM trains, yes when only visual parts train (else no gradient) and under ZeRO-3 (see
# Ovis._stand_in_needed and trainable.visual_sync_mode).
CASES = [
    ("zero2_stage2_recipe", 2, ["visual_tokenizer", "vte"], [(2, 0), (0, 0)], [2, 2]),
    ("zero2_all", 2, ["all"], [(2, 0), (0, 0)], [1, 1]),
    ("zero3_all", 3, ["all"], [(2, 0), (0, 0)], [2, 2]),
]


def worker(out_path: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from ovis_model.batching import collate_packed
    from ovis_model.tiny import tiny_ovis
    from ovis_model.train.setup import init_distributed
    from ovis_model.trainable import select_trainable, visual_sync_mode

    init_distributed()  # as ovis-train starts: gloo, and no DeepSpeed op built on a CPU
    rank = dist.get_rank()
    results = {}
    for name, stage, trainable, steps, _ in CASES:
        model = tiny_ovis(seed=0)
        select_trainable(model, trainable)
        model.sync_visual_forward = visual_sync_mode(model, stage)  # as ovis-train sets it
        reference = tiny_ovis(seed=0)
        select_trainable(reference, trainable)
        frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "steps_per_print": 1000000,
            "zero_allow_untested_optimizer": True,  # plain SGD (see LR)
            "gradient_clipping": 0.0,  # explicit: ZeRO-3 otherwise clips, and the reference does not
        }
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=torch.optim.SGD(params, lr=LR), config=config
        )
        ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=LR)
        vit_calls: list[int] = []
        hook = engine.module.visual_tokenizer.backbone.register_forward_hook(
            lambda *_, calls=vit_calls: calls.append(1)
        )
        losses = []
        for step, images_per_rank in enumerate(steps):
            records = [_record(100 * step + r, images_per_rank[r]) for r in range(WORLD)]
            batches = [
                collate_packed([rec], model.image_processor, model.num_visual_tokens) for rec in records
            ]
            global_count = sum(b["n_supervised"] for b in batches)
            # DeepSpeed averages gradients over ranks: scale by the world size to get sum / global count
            out = engine(**batches[rank], loss_normalizer=global_count / WORLD)
            engine.backward(out.loss)
            engine.step()
            ref_opt.zero_grad()
            ref_loss = sum(reference(**b).loss_sum for b in batches) / global_count
            ref_loss.backward()
            ref_opt.step()
            losses.append(float(ref_loss))
        hook.remove()
        vit_forwards: list = [None] * WORLD
        dist.all_gather_object(vit_forwards, len(vit_calls))
        max_diff = max_update = 0.0
        frozen_changed = []
        initial = tiny_ovis(seed=0)
        for (n, p), (_, q) in zip(
            engine.module.named_parameters(), reference.named_parameters(), strict=True
        ):
            with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
                full = p.detach().clone()
            max_diff = max(max_diff, float((full - q.detach()).abs().max()))
            max_update = max(max_update, float((q.detach() - initial.get_parameter(n)).abs().max()))
            if n in frozen_before and not torch.equal(full, frozen_before[n]):
                frozen_changed.append(n)
        results[name] = {
            "max_param_diff_vs_reference": max_diff,
            "max_update": max_update,
            "frozen_changed": frozen_changed,
            "vit_forwards_per_rank": vit_forwards,
            "losses": losses,
        }
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=2))
    dist.barrier()
    # Torn down while Python is whole: left to the interpreter's exit, the process group's C++ threads can
    # outlive what they hold and end the process in std::terminate (as ovis-train does: train/setup.py).
    dist.destroy_process_group()


def test_zero2_and_zero3_two_ranks_one_without_image(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "results.json"
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as sock:  # a free port: other test runs may share the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [torchrun, "--nproc_per_node", str(WORLD), "--master_port", str(port), __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    for name, _, trainable, _, vit_forwards in CASES:
        r = results[name]
        assert r["max_param_diff_vs_reference"] < 1e-5, (name, r)
        assert all(np.isfinite(r["losses"])), (name, r)
        if trainable != ["all"]:
            assert r["frozen_changed"] == [], (name, r)
        assert r["max_update"] > 1e-3, (name, r)  # the step did move the weights
        assert r["vit_forwards_per_rank"] == vit_forwards, (name, r)


if __name__ == "__main__":
    worker(sys.argv[1])
