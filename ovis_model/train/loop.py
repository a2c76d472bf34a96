"""`train()`: one loop for every stage (stages are data: the recipe says what trains and how).

Reads top to bottom: set up (checked before any compute), resume if asked, then per optimizer step fetch
its micro-batches, normalise by the step's global supervised-token count, forward/backward each through
DeepSpeed, log, checkpoint every `save_every` steps and on SIGTERM; at the end, a model directory.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch

from ..batching import batch_to
from . import checkpoint, memory
from .elastic import ElasticError
from .evaluate import Evaluator
from .flops import Throughput
from .loader import TrainLoader
from .loss import all_reduce_sum, global_supervised, loss_normalizer, next_step
from .metrics import Metrics, drop_superseded
from .safe_load import UnsafeCheckpointError
from .samplelog import SampleLog
from .setup import (
    RunArgs,
    TrainError,
    build_engine,
    build_loader,
    build_model,
    check_memory,
    init_distributed,
    lock_run,
    prepare,
    step_plan,
    trainable_rows,
    write_module_table,
)


class DataLossError(TrainError):
    """train.skip_bad_shards lost more than train.max_lost_fraction of an epoch, or a whole step."""


def train(args: RunArgs, say=print) -> dict:  # noqa: ANN001 - say: print-like
    """Train one stage as `args` and its recipe say; returns the run's summary (also in RUN/stageN)."""
    prep = prepare(args)  # recipe, data, starting model: checked, nothing loaded (TrainError: exit 2)
    lock = lock_run(prep.run_dir, say)  # one run per stage folder (rank 0 holds it), before any compute
    try:
        return _run(prep, args, lock, say)
    except BaseException:
        if lock is not None:
            lock.abandon()  # refused before it wrote anything: no run folder left behind
        raise


def _run(prep, args: RunArgs, lock, say) -> dict:  # noqa: ANN001
    """The run proper, its folder locked."""
    cfg, run_dir = prep.cfg, prep.run_dir
    rank, world, device = init_distributed()
    main = rank == 0
    bf16 = bool(cfg.train["bf16"]) and device.type == "cuda" and torch.cuda.is_bf16_supported()
    model = build_model(prep, args, torch.bfloat16 if bf16 else None)
    loader = build_loader(prep, model, rank, world)
    plan = step_plan(prep, loader, world)
    engine, ds_config = build_engine(prep, model, plan, world, bf16)
    check_memory(prep, model, device, world, bf16)  # a budget that cannot fit: TrainError (exit 2) now
    ckpt_dir = run_dir / "checkpoints"
    step = (
        resume_from_checkpoint(engine, loader, ckpt_dir, device, say if main else _quiet)
        if args.resume
        else 0
    )
    loader.on_bad = lambda event: say(_bad_shard_line(event, rank, world))
    sample_log = SampleLog(run_dir, rank, cfg.train["log_samples"])
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        effective = {"config": json.loads(cfg.to_json()), "deepspeed": ds_config, "world_size": world}
        effective["plan"] = plan.__dict__ | {"micro_batch_tokens": cfg.micro_batch_tokens, "bf16": bf16}
        effective["attn_implementation"] = model.attn_implementation  # "auto" resolved
        (run_dir / "config.json").write_text(json.dumps(effective, indent=1, sort_keys=True) + "\n")
        say(
            f"stage {cfg.stage} ({Path(cfg.recipe).name}) on {world} rank(s), {device.type}, "
            f"{'bf16' if bf16 else 'fp32'}, attention {model.attn_implementation}; data {prep.data_dir}"
        )
        write_module_table(model, run_dir / "modules.txt")
        for part, trained, total in trainable_rows(model):
            say(
                f"  {'train ' if trained == total else 'freeze' if not trained else 'part  '} {part}: "
                f"{trained:,} of {total:,} parameters trained"
            )
        say(f"  (every module's state and size: {run_dir / 'modules.txt'})")
        say("  " + plan.describe(cfg.train["global_batch_samples"], world))
        if step:
            say(f"  resumed from {ckpt_dir / f'{checkpoint.TAG_PREFIX}{step}'} at step {step}")
            drop_superseded(run_dir, step)  # the killed run's steps past the checkpoint are done again
            sample_log.resumed_at(step)
            if loader.resumed_change:
                say(f"  {loader.resumed_change}")
    metrics = Metrics(run_dir, plan.steps, enabled=main, log_every=cfg.train["log_every"])
    metrics.event("start", {"step": step, "steps": plan.steps, "world_size": world})
    evaluator = Evaluator(prep, engine, device, bf16, rank, world, metrics, say, args.resume)
    throughput = Throughput(model, device, world, cfg.train["peak_tflops"], bf16)

    stop = {"requested": False}  # SIGTERM (preemption, scancel): checkpoint, then exit
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    dtype = torch.bfloat16 if bf16 else None
    engine.train()
    micro_batches = iter(loader)
    epoch = loader.epoch
    try:
        while step < plan.steps:
            t0 = time.perf_counter()
            memory.reset_peak(device)
            batches = next_step(micro_batches, plan.grad_accum)
            global_count = global_supervised(batches, device)
            if cfg.train["skip_bad_shards"]:
                check_data_loss(step + 1, loader, global_count, cfg.train["max_lost_fraction"], device)
            norm = loss_normalizer(global_count, world, plan.grad_accum)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # read once per step: no GPU sync
            for mb in batches:
                inputs = batch_to(mb["inputs"], device, dtype, model.image_processor)
                out = engine(**inputs, loss_normalizer=norm)
                engine.backward(out.loss)
                engine.step()  # DeepSpeed steps the optimizer on the last micro-batch of the step
                loss_sum += out.loss_sum.detach().double()
            step += 1
            sample_log.write(step, batches)
            local = [float(loss_sum), *(sum(mb["meta"][k] for mb in batches) for k in ("tokens", "samples"))]
            loss_total, tokens, samples = all_reduce_sum([*local], device)
            grad_norm = engine.get_global_grad_norm()
            metrics.step(
                step,
                {
                    "loss": loss_total / max(global_count, 1),
                    "lr": engine.get_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens": int(tokens),
                    "samples": int(samples),
                    "supervised": global_count,
                    "step_time": time.perf_counter() - t0,
                    "peak_memory_mib": memory.peak_bytes(device) / 2**20,  # rank 0's (GPU: tensors; CPU: RSS)
                    # the epoch the step's micro-batches came from, 0-based as in epoch_end events (the
                    # loader has moved to the next one once the last micro-batch of an epoch is out)
                    "epoch": int(batches[0]["meta"]["epoch"]),
                    **throughput.values(batches, time.perf_counter() - t0),
                },
            )
            evaluator.after_step(step)
            if loader.epoch != epoch:  # the step crossed into a new epoch
                metrics.event("epoch_end", loader.epoch_summary(epoch))
                epoch = loader.epoch
            stopping = all_reduce_sum([float(stop["requested"])], device)[0] > 0  # every rank agrees
            if stopping or step % cfg.train["save_every"] == 0 or step == plan.steps:
                client = {"step": step, "loader": loader.state_dict()}
                path = checkpoint.save(engine, ckpt_dir, step, client, cfg.train["keep_checkpoints"])
                metrics.event("checkpoint", {"step": step, "path": str(path)})
            if stopping:
                if main:
                    say(f"stopped by SIGTERM at step {step}; resume with --resume (checkpoint {path})")
                metrics.event("stopped", {"step": step})
                if lock is not None:
                    lock.release()
                return {"stage": cfg.stage, "step": step, "stopped": True, "run_dir": str(run_dir)}
        val = evaluator.at_end(step)  # the final model's val loss (None without a val split)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        micro_batches.close()  # stops the loader's workers now, not at garbage collection
        metrics.close()

    model_dir = run_dir / "model"
    checkpoint.export_model(engine, model_dir, int(ds_config["zero_optimization"].get("stage", 0)))
    summary = {
        "stage": cfg.stage,
        "step": step,
        "stopped": False,
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
        "epoch": loader.epoch_summary(epoch),
        "val_loss": val,
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        for line in _bad_shards_summary(loader):
            say(line)
        say(f"stage {cfg.stage} done: {step} steps; model in {model_dir}")
    if lock is not None:
        lock.release()
    return summary


def _quiet(_text: str) -> None:
    pass


def resume_from_checkpoint(
    engine: object, loader: TrainLoader, ckpt_dir: Path, device: torch.device, say
) -> int:  # noqa: ANN001 - say: print-like
    """The step of the newest complete checkpoint, restored (model, optimizer, schedule, loader). Rank 0
    verifies the checkpoints' manifests, saying why it passes over any newer one, and every rank loads
    the one it chose; none complete, or a file that holds code: TrainError (exit 2)."""
    chosen, passed = checkpoint.choose(ckpt_dir, say) if torch.distributed.get_rank() == 0 else (None, [])
    step = int(all_reduce_sum([float(chosen + 1) if chosen is not None else 0.0], device)[0]) - 1
    if step < 0:
        raise TrainError(
            f"--resume: no complete checkpoint in {ckpt_dir}"
            + (f" ({'; '.join(passed)})" if passed else "")
            + ": remove that folder (or use another --out) to start the stage over"
        )
    try:
        state = checkpoint.load(engine, ckpt_dir, step)
    except (UnsafeCheckpointError, ElasticError) as e:
        raise TrainError(str(e)) from e
    loader.load_state_dict(state["loader"])
    return int(state["step"])


def check_data_loss(
    step: int, loader: TrainLoader, global_count: int, max_fraction: float, device: torch.device
) -> None:
    """Under train.skip_bad_shards: stop (DataLossError) when the ranks together lost more than
    `max_fraction` of the epoch's records so far, or the step has no supervised token to learn from."""
    records = loader.dataset.plan(loader.epoch).summary["records"]
    lost, total = all_reduce_sum([float(loader.epoch_lost_records), float(records)], device)
    if lost > max_fraction * total:
        shards = ", ".join(sorted(loader.bad)[:3]) + (" ..." if len(loader.bad) > 3 else "")
        raise DataLossError(
            f"damaged shards lost {int(lost):,} of the epoch's {int(total):,} records ({lost / total:.1%}, "
            f"more than train.max_lost_fraction={max_fraction}) by step {step}: {shards}; repair or re-pack "
            "the stage (ovis-data inspect SHARD), or raise the limit"
        )
    if global_count == 0:
        raise DataLossError(
            f"step {step} has no supervised token (damaged shards took its records: "
            f"{', '.join(sorted(loader.bad))}): nothing to learn from; repair or re-pack the stage"
        )


def _bad_shard_line(event: dict, rank: int, world: int) -> str:
    where = f" (rank {rank})" if world > 1 else ""
    return f"  skipping damaged shard {event['shard']}{where}: record {event['record']}: {event['reason']}"


def _bad_shards_summary(loader: TrainLoader) -> list[str]:
    if not loader.bad:
        return []
    lines = [f"  {len(loader.bad)} damaged shard(s) skipped, {loader.lost_records:,} record(s) lost:"]
    return lines + [
        f"    {name}: record {e['record']}: {e['reason']}" for name, e in sorted(loader.bad.items())
    ]
