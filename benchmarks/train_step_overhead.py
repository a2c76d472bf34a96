"""Step overhead of `ovis-train` on CPU: a training step through the trainer versus the bare
forward + backward + optimizer step of the same model, DeepSpeed engine and micro-batches.

    python benchmarks/train_step_overhead.py --profile   # [--steps 20] [--warmup 5] [--rounds 6] [--work DIR]

Setup (once, cached in --work): a small byte-level BPE (tests/test_templates_tokenizers.py's Llama-3-like
one: a 151k-vocabulary LM head would be most of a CPU step), a Qwen2-shaped LLM (hidden 256, 4 layers) and
a CLIP ViT (hidden 128, 4 blocks, 112 px, 66 visual tokens per image), joined by `Ovis.from_parts` and saved
as the model a stage 3 starts from; the demo corpus's stage 3 packed with that tokenizer (capacity 512).

Trainer side: `python -m ovis_model.train --stage 3 --init MODEL` as users run it (the stage-3 recipe: every
part trains, its DeepSpeed config, AdamW, DataLoader workers, metrics, TensorBoard), with checkpoints
only after the last step. Per step we read metrics.jsonl: `step_time` (the loop's own clock: fetching the
step's micro-batches, the normaliser, forward/backward/step of each) and the interval between consecutive
step records (the whole loop iteration: `step_time` plus the logging, the SIGTERM all-reduce and the
checkpoint check that follow it).

Bare side: a process that builds the model, loader, step plan and DeepSpeed engine with the trainer's own
functions (ovis_model.train.setup: same recipe freezing, same DeepSpeed config, same seed, hence the same
micro-batches), first pulls every micro-batch it will use from the loader into a list and stops the
loader's workers, then times `engine(**inputs); engine.backward(loss); engine.step()` per micro-batch,
the step's micro-batches in a row: no loader, metrics, all-reduces or checkpoint logic.

Rounds alternate trainer and bare runs; the first `--warmup` steps of every run are skipped. Overhead:
median(trainer iteration) / median(bare step) - 1 over the pooled steps of all rounds, beside the per-round
ratios, 20th percentiles and, per step index (the same micro-batches in every run), the best of the rounds
on each side (robust to bursts of other load). A shared 2-vCPU machine moves a run's median by several
percent (hypervisor steal, co-tenants), so the loop's additions are also measured directly: the time after
`step_time` (logging, the SIGTERM all-reduce, the checkpoint check), and with --profile an in-process
trainer run that times each step's wait for its micro-batches. Before each run the script waits until the
machine is idle (other processes under 10% of the CPUs) and repeats a run that others disturbed; the
report gives the CPU share others took and the hypervisor's steal during each run.
Results: benchmarks/results/train_step_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from sessions import kill_session  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the model and data (see the module docstring)
LLM = dict(hidden_size=256, layers=4, heads=4, kv_heads=2)
VIT = dict(hidden_size=128, layers=4, image_size=112)
VISUAL_VOCAB = 1024
CAPACITY = 512  # packed sequence length
MICRO_BATCH_TOKENS = 1024
GLOBAL_BATCH_SAMPLES = 5  # 2 micro-batches per optimizer step
OVERRIDES = [
    f"train.global_batch_samples={GLOBAL_BATCH_SAMPLES}",
    "train.save_every=1000000",  # no checkpoint until the last step (after the timed ones)
    "train.lr_by_family={}",
    "train.gradient_checkpointing=false",
    "train.warmup_ratio=0.0",
]
BASE_OVERRIDES = list(OVERRIDES)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- setup --------------------------------------------------------------------------------------------------
def setup(work: Path) -> dict:
    """Tokenizer, parts, the stage-3 starting model and the packed demo stage 3 (cached in `work`)."""
    done = work / "setup.json"
    if done.is_file():
        return json.loads(done.read_text())
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(REPO / "tests"))
    from test_templates_tokenizers import llama3_tokenizer, save

    from ovis_data.demo_corpus import build_demo_corpus
    from ovis_data.pack.stage import pack_stage
    from ovis_model.modeling import Ovis
    from ovis_model.preprocess import CLIP_MEAN, CLIP_STD, OvisImageProcessor
    from ovis_model.tiny import tiny_llm_config, tiny_vit_config

    hf_logging.disable_progress_bar()
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = save(llama3_tokenizer(), work / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    llm_cfg = tiny_llm_config(vocab_size=len(tok), **LLM)
    llm_cfg.eos_token_id = tok.convert_tokens_to_ids("<|eot_id|>")
    AutoModelForCausalLM.from_config(llm_cfg).save_pretrained(work / "llm")
    tok.save_pretrained(work / "llm")
    AutoModel.from_config(tiny_vit_config("clip", **VIT)).save_pretrained(work / "vit")
    OvisImageProcessor(
        image_size=VIT["image_size"], image_mean=CLIP_MEAN, image_std=CLIP_STD
    ).save_pretrained(work / "vit")
    model = Ovis.from_parts(
        work / "llm",
        work / "vit",
        visual_vocab_size=VISUAL_VOCAB,
        attn_implementation="sdpa",
        pad_token_id=tok.convert_tokens_to_ids("<|end_of_text|>"),
    )
    model.save_pretrained(work / "init")
    root = build_demo_corpus(work / "corpus", seed=0)
    manifest = pack_stage(
        3,
        root,
        work / "llm",
        work / "packed",
        processes=min(2, os.cpu_count() or 1),
        packs_per_shard=8,
        visual_tokens=model.num_visual_tokens,
        image_size=VIT["image_size"],
        max_length=CAPACITY,
    )
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_visual_tokens": model.num_visual_tokens,
        "vocab_size": len(tok),
        "records": manifest["records"],
        "samples": manifest["samples"],
    }
    done.write_text(json.dumps(info, indent=1))
    return info


def run_args(work: Path, out: Path, steps: int):  # noqa: ANN201 - RunArgs, imported late
    from ovis_model.train.setup import RunArgs

    return RunArgs(
        data=work / "packed",
        out=out,
        stage=3,
        init=work / "init",
        max_steps=steps,
        micro_batch_tokens=MICRO_BATCH_TOKENS,
        overrides=list(OVERRIDES),
    )


# -- the two sides ------------------------------------------------------------------------------------------
def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.setdefault("PYTHONWARNINGS", "ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_child(cmd: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    """`cmd` in a session of its own; on timeout every process of that session is killed (DataLoader
    workers, forkserver, a JIT compile), never only the direct child."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def trainer_run(work: Path, out: Path, steps: int) -> dict:
    """`ovis-train` in its own process; per-step times from metrics.jsonl."""
    shutil.rmtree(out, ignore_errors=True)
    args = run_args(work, out, steps)
    cmd = [sys.executable, "-m", "ovis_model.train", "--stage", "3", "--data", str(args.data),
           "--out", str(out), "--init", str(args.init), "--max-steps", str(steps),
           "--micro-batch-tokens", str(MICRO_BATCH_TOKENS)]  # fmt: skip
    for o in OVERRIDES:
        cmd += ["--set", o]
    proc = run_child(cmd)
    if proc.returncode != 0:
        raise RuntimeError(
            f"ovis-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result = trainer_metrics(out)
    result["log_lines"] = [line for line in proc.stderr.splitlines() if line.startswith("step ")][-1:]
    return result


def trainer_metrics(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "stage3" / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "step_time" in r]
    start = next(r for r in records if r.get("event") == "start")
    config = json.loads((out / "stage3" / "config.json").read_text())
    times = [r["time"] for r in steps_]
    return {
        "step_time": [r["step_time"] for r in steps_],
        # the whole loop iteration: from one step record to the next (the first: from the start event)
        "iteration": [b - a for a, b in zip([start["time"], *times[:-1]], times, strict=True)],
        "tokens": [r["tokens"] for r in steps_],
        "grad_accum": config["plan"]["grad_accum"],
        "deepspeed_zero_stage": config["deepspeed"]["zero_optimization"]["stage"],
        "num_workers": config["config"]["train"]["num_workers"],
    }


def bare_main(work: Path, out: Path, steps: int, result_path: Path) -> None:
    """The bare loop (run in its own process, as the trainer is): see the module docstring."""
    import torch

    from ovis_model.batching import batch_to
    from ovis_model.train.setup import (
        build_engine,
        build_loader,
        build_model,
        init_distributed,
        prepare,
        step_plan,
    )

    args = run_args(work, out, steps)
    prep = prepare(args)  # as ovis_model.train.loop.train does, up to its loop
    rank, world, device = init_distributed()
    bf16 = bool(prep.cfg.train["bf16"]) and device.type == "cuda" and torch.cuda.is_bf16_supported()
    model = build_model(prep, args, torch.bfloat16 if bf16 else None)
    loader = build_loader(prep, model, rank, world)
    plan = step_plan(prep, loader, world)
    engine, ds_config = build_engine(prep, model, plan, world, bf16)
    dtype = torch.bfloat16 if bf16 else None
    micro_batches = iter(loader)
    held = [[next(micro_batches) for _ in range(plan.grad_accum)] for _ in range(steps)]
    del micro_batches  # stops the DataLoader's workers: nothing else runs while timing
    import gc

    gc.collect()
    time.sleep(1.0)
    engine.train()
    step_time, tokens, cpu = [], [], []
    for batches in held:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        norm = max(sum(mb["n_supervised"] for mb in batches), 1) / (world * plan.grad_accum)
        for mb in batches:
            out_ = engine(
                **batch_to(mb["inputs"], device, dtype, model.image_processor), loss_normalizer=norm
            )
            engine.backward(out_.loss)
            engine.step()
        step_time.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds() - c0)
        tokens.append(sum(mb["meta"]["tokens"] for mb in batches))
    result_path.write_text(
        json.dumps(
            {
                "step_time": step_time,
                "cpu": cpu,
                "tokens": tokens,
                "grad_accum": plan.grad_accum,
                "deepspeed_zero_stage": ds_config["zero_optimization"]["stage"],
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


def _cpu_seconds() -> float:
    """CPU time of this process, all its threads (not its children)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def profiled_trainer_main(work: Path, out: Path, steps: int, result_path: Path) -> None:
    """`ovis_model.train.loop.train` in this process, timing each step's wait for its micro-batches and
    the CPU time this process (not its DataLoader workers) spends per step (a diagnostic: --profile)."""
    from ovis_model.train import loop

    fetch: list[float] = []
    marks: list[float] = []
    next_step, metrics_step = loop.next_step, loop.Metrics.step

    def timed_next_step(it, n):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        batches = next_step(it, n)
        fetch.append(time.perf_counter() - t)
        return batches

    def marked_step(self, step, values):  # noqa: ANN001, ANN202
        marks.append(_cpu_seconds())
        return metrics_step(self, step, values)

    loop.next_step, loop.Metrics.step = timed_next_step, marked_step
    start = _cpu_seconds()
    loop.train(run_args(work, out, steps), say=lambda *_: None)
    cpu = [b - a for a, b in zip([start, *marks[:-1]], marks, strict=True)]
    result_path.write_text(json.dumps({"fetch": fetch, "cpu": cpu}))


def _child(mode: str, result_name: str, work: Path, out: Path, steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, "--work", str(work),
           "--out", str(out), "--steps", str(steps)]  # fmt: skip
    for o in OVERRIDES[len(BASE_OVERRIDES) :]:
        cmd += ["--set", o]
    proc = run_child(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out / result_name).read_text())


def bare_run(work: Path, out: Path, steps: int) -> dict:
    return _child("--bare", "bare.json", work, out, steps)


def profiled_trainer_run(work: Path, out: Path, steps: int) -> dict:
    result = _child("--profiled-trainer", "profiled.json", work, out / "p", steps)
    result.update(trainer_metrics(out / "p"))
    return result


# -- the machine's other load ----------------------------------------------------------------------------
class LoadMonitor:
    """CPU seconds used by processes outside this script's process tree, sampled every 0.5 s in a thread
    (a process that ends between samples loses at most its last 0.5 s). Without psutil: None."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return
        self.psutil = psutil
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, initial: bool) -> None:
        ps = self.psutil
        me = ps.Process()
        try:
            mine = {me.pid, *(p.pid for p in me.children(recursive=True))}
        except ps.Error:
            return
        for p in ps.process_iter(["pid", "cpu_times", "create_time"]):
            times = p.info["cpu_times"]
            if p.info["pid"] in mine or times is None:
                continue
            key = (p.info["pid"], p.info["create_time"])
            used = times.user + times.system
            if key not in self.first:
                self.first[key] = used if initial else 0.0  # started during the run: all of it counts
            self.last[key] = used

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._sample(False)

    @staticmethod
    def _cpu_jiffies() -> tuple[int, int] | None:
        """(steal, total) jiffies of all CPUs from /proc/stat: time the hypervisor gave to other guests."""
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])

    def __enter__(self) -> LoadMonitor:
        self.jiffies0 = self._cpu_jiffies()
        if self.psutil is not None:
            self._sample(True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.jiffies1 = self._cpu_jiffies()
        if self.psutil is not None:
            self.stop.set()
            self.thread.join()
            self._sample(False)

    @property
    def steal_share(self) -> float | None:
        if self.jiffies0 is None or self.jiffies1 is None or self.jiffies1[1] == self.jiffies0[1]:
            return None
        return (self.jiffies1[0] - self.jiffies0[0]) / (self.jiffies1[1] - self.jiffies0[1])

    @property
    def others_cpu_s(self) -> float | None:
        if self.psutil is None:
            return None
        return sum(self.last[k] - self.first[k] for k in self.last)


def wait_idle(max_wait_s: float, threshold: float = 0.10) -> dict:
    """Wait (up to max_wait_s) until other processes use under `threshold` of the CPUs over 3 s."""
    n_cpu = os.cpu_count() or 1
    t_start = time.time()
    while True:
        with LoadMonitor() as mon:
            time.sleep(3.0)
        busy = None if mon.others_cpu_s is None else mon.others_cpu_s / 3.0 / n_cpu
        if busy is None or busy < threshold or time.time() - t_start > max_wait_s:
            return {"others_cpu_share": busy, "waited_s": round(time.time() - t_start, 1),
                    "loadavg_1m": os.getloadavg()[0]}  # fmt: skip
        log(f"machine busy (other processes use {busy:.0%} of {n_cpu} CPUs); waiting")
        time.sleep(20.0)


def measured(fn, *args, max_wait_s: float, attempts: int = 3, threshold: float = 0.10) -> dict:  # noqa: ANN001
    """fn(*args) on an idle machine; run again (up to `attempts` times) when other processes took more
    than `threshold` of the CPUs during the run."""
    disturbed = []
    for attempt in range(attempts):
        before = wait_idle(max_wait_s, threshold)
        t0 = time.time()
        with LoadMonitor() as mon:
            result = fn(*args)
        wall = time.time() - t0
        share = None if mon.others_cpu_s is None else mon.others_cpu_s / wall / (os.cpu_count() or 1)
        result["load"] = {
            "before": before,
            "others_cpu_share_during": share,
            "steal_share_during": mon.steal_share,
            "wall_s": round(wall, 1),
        }
        if share is None or share < threshold or attempt == attempts - 1:
            break
        log(f"other processes used {share:.0%} of the CPUs during the run: running it again")
        disturbed.append(dict(result["load"]))
    result["load"]["disturbed_attempts"] = disturbed
    return result


# -- main ---------------------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "p20": statistics.quantiles(values, n=5)[0],
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=5, help="steps skipped at the start of every run")
    ap.add_argument("--rounds", type=int, default=6, help="trainer/bare pairs, alternated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ovis_train_step_overhead"))
    ap.add_argument("--max-wait-s", type=float, default=900.0, help="longest wait for an idle machine")
    ap.add_argument(
        "--results", type=Path, default=REPO / "benchmarks" / "results" / "train_step_overhead.json"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more ovis-train overrides for both sides (e.g. train.num_workers=0)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of both sides (default: torch's)"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also: one in-process trainer run timing its fetches and its own CPU per step",
    )
    ap.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profiled-trainer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    OVERRIDES.extend(args.set)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.bare:
        bare_main(args.work, args.out, args.steps, args.out / "bare.json")
        return
    if args.profiled_trainer:
        profiled_trainer_main(args.work, args.out, args.steps, args.out / "profiled.json")
        return

    import torch

    info = setup(args.work)
    log(f"model: {info['parameters']:,} parameters, {info['num_visual_tokens']} visual tokens per image; "
        f"data: demo stage 3, {info['records']} packed records of <= {CAPACITY} tokens")  # fmt: skip
    total = args.warmup + args.steps
    runs: dict[str, list[dict]] = {"trainer": [], "bare": []}
    for r in range(args.rounds):
        for side in ("trainer", "bare"):
            out = args.work / "runs" / f"{side}{r}"
            fn = trainer_run if side == "trainer" else bare_run
            res = measured(fn, args.work, out, total, max_wait_s=args.max_wait_s)
            runs[side].append(res)
            st = res["step_time"][args.warmup :]
            log(f"round {r} {side}: median step {statistics.median(st):.4f} s over {len(st)} steps "
                f"(grad accum {res['grad_accum']}); other processes used "
                f"{res['load']['others_cpu_share_during'] or 0:.1%} of the CPUs, hypervisor steal "
                f"{res['load']['steal_share_during'] or 0:.1%}")  # fmt: skip

    def pooled(side: str, key: str) -> list[float]:
        return [v for run in runs[side] for v in run[key][args.warmup :]]

    bare = summary(pooled("bare", "step_time"))
    trainer_step = summary(pooled("trainer", "step_time"))
    trainer_iter = summary(pooled("trainer", "iteration"))
    # the same steps see the same micro-batches on both sides: paired ratios
    # per step index (the same micro-batches in every run), the best of the rounds on each side: robust to
    # bursts of other load, which come and go between rounds
    best = [
        min(run["iteration"][k] for run in runs["trainer"]) / min(run["step_time"][k] for run in runs["bare"])
        for k in range(args.warmup, total)
    ]
    paired = [
        t / b
        for tr, ba in zip(runs["trainer"], runs["bare"], strict=True)
        for t, b in zip(tr["iteration"][args.warmup :], ba["step_time"][args.warmup :], strict=True)
    ]
    same_batches = all(
        tr["tokens"] == ba["tokens"] for tr, ba in zip(runs["trainer"], runs["bare"], strict=True)
    )
    report = {
        "what": "ovis-train step vs bare DeepSpeed fwd/bwd/step: same model, engine, micro-batches",
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads_bare": runs["bare"][0]["torch_threads"],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "setup": {
            **info,
            "llm": LLM,
            "vit": VIT,
            "visual_vocab_size": VISUAL_VOCAB,
            "capacity": CAPACITY,
            "micro_batch_tokens": MICRO_BATCH_TOKENS,
            "overrides": OVERRIDES,
            "recipe": "pipelines/stage3.toml (trainable all)",
            "grad_accum": runs["trainer"][0]["grad_accum"],
            "deepspeed_zero_stage": runs["trainer"][0]["deepspeed_zero_stage"],
            "optimizer": "DeepSpeed engine with torch AdamW (the trainer's config), fp32 on CPU",
            "dataloader_workers": runs["trainer"][0]["num_workers"],
        },
        "warmup_steps_skipped": args.warmup,
        "rounds": args.rounds,
        "same_micro_batches": same_batches,
        "bare_step_s": bare,
        "trainer_step_time_s": trainer_step,
        "trainer_iteration_s": trainer_iter,
        "overhead_step_time": trainer_step["median"] / bare["median"] - 1,
        "overhead_iteration": trainer_iter["median"] / bare["median"] - 1,
        "overhead_paired_median": statistics.median(paired) - 1,
        "overhead_p20": trainer_iter["p20"] / bare["p20"] - 1,
        "overhead_best_of_rounds_per_step_median": statistics.median(best) - 1,
        "overhead_by_round": [
            statistics.median(tr["iteration"][args.warmup :])
            / statistics.median(ba["step_time"][args.warmup :])
            - 1
            for tr, ba in zip(runs["trainer"], runs["bare"], strict=True)
        ],
        "runs": runs,
    }
    log(f"bare step (median):                {bare['median']:.4f} s")
    log(f"ovis-train step_time (median):     {trainer_step['median']:.4f} s  "
        f"overhead {report['overhead_step_time']:+.2%}")  # fmt: skip
    log("overhead by round: " + ", ".join(f"{x:+.1%}" for x in report["overhead_by_round"])
        + f"; 20th percentiles: {report['overhead_p20']:+.2%}; best of rounds per step: "
        f"{report['overhead_best_of_rounds_per_step_median']:+.2%}")  # fmt: skip
    log(f"ovis-train whole iteration (median): {trainer_iter['median']:.4f} s  "
        f"overhead {report['overhead_iteration']:+.2%}  (paired per-step median "
        f"{report['overhead_paired_median']:+.2%}); same micro-batches: {same_batches}")  # fmt: skip
    # what the loop adds, measured directly: logging + the SIGTERM all-reduce + the checkpoint check (after
    # step_time), and (--profile) the wait for each step's micro-batches from the DataLoader
    after = [
        i - t
        for run in runs["trainer"]
        for i, t in zip(run["iteration"][args.warmup :], run["step_time"][args.warmup :], strict=True)
    ]
    report["components_s"] = {"after_step_time": summary(after)}
    cpu_bare = [c for run in runs["bare"] for c in run["cpu"][args.warmup :]]
    report["bare_cpu_per_step_s"] = summary(cpu_bare)
    if args.profile:
        prof = measured(profiled_trainer_run, args.work, args.work / "runs" / "profiled", total,
                        max_wait_s=args.max_wait_s)  # fmt: skip
        fetch, cpu = prof["fetch"][args.warmup :], prof["cpu"][args.warmup :]
        report["profile"] = {
            "what": "ovis-train's loop in-process: wait for each step's micro-batches, and the CPU time of "
            "the training process itself (its threads, not its DataLoader workers) per step",
            "fetch_s": summary(fetch),
            "trainer_cpu_per_step_s": summary(cpu),
            "trainer_iteration_s": summary(prof["iteration"][args.warmup :]),
            "bare_cpu_per_step_s": report["bare_cpu_per_step_s"],
            "load": prof["load"],
        }
        report["components_s"]["fetch_wait"] = summary(fetch)
        added = statistics.median(fetch) + report["components_s"]["after_step_time"]["median"]
        report["components_share_of_bare_step"] = added / bare["median"]
        log(f"fetch wait + logging: {added * 1e3:.1f} ms a step, {added / bare['median']:.2%} of a bare step")
        log(f"profile: fetch wait median {statistics.median(fetch) * 1e3:.1f} ms a step; CPU of the trainer "
            f"process per step: ovis-train {statistics.median(cpu):.3f} s, bare "
            f"{report['bare_cpu_per_step_s']['median']:.3f} s")  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.results}")


if __name__ == "__main__":
    main()
