"""Everything the loop needs, checked before any compute: recipe, data, model, loader, DeepSpeed engine."""

from __future__ import annotations

import json
import logging
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ovis_data.errors import OvisDataError
from ovis_data.recipes import select_recipe
from ovis_data.shardformat import MANIFEST
from ovis_data.storage import AnyPath, as_path

from ..attention import default_attn_implementation, log_recompiles, pad_multiple
from ..model_dir import check_safetensors_only
from ..trainable import select_trainable, visual_sync_mode
from . import checkpoint
from .config import ConfigError, StepPlan, TrainConfig, deepspeed_config, plan_steps
from .contract import ContractError, check_manifest
from .datacheck import DataCheckError, check_shards
from .dataset import PackedStage, read_manifest
from .elastic import ElasticError, check_zero3_world
from .loader import TrainLoader
from .runlock import RunLock, RunLockedError

if TYPE_CHECKING:
    from ..modeling import Ovis

log = logging.getLogger("ovis_train")


class TrainError(ValueError):
    """Bad input found before training starts: one line naming the thing, exit status 2."""


@dataclass
class RunArgs:
    """What `ovis-train` was asked (see its --help)."""

    data: Path
    out: Path
    stage: int | None = None
    recipe: Path | None = None
    llm: Path | None = None
    vit: Path | None = None
    init: Path | None = None
    max_steps: int | None = None
    resume: bool = False
    micro_batch_tokens: int | None = None
    overrides: list[str] = field(default_factory=list)
    dataset_info: Path | None = None
    verify_data: bool = False  # also check every shard's sha256 (sizes are always checked)


@dataclass
class Prepared:
    cfg: TrainConfig
    run_dir: Path
    data_dir: AnyPath
    manifest: dict
    manifest_path: AnyPath
    init_dir: Path | None


def prepare(args: RunArgs) -> Prepared:
    """Recipe, overrides, data folder and starting model located and checked; nothing loaded yet."""
    try:
        recipe, _ = select_recipe(args.stage, args.recipe, args.dataset_info)
    except OvisDataError as e:
        raise TrainError(str(e)) from e
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={int(args.max_steps)}")
    if args.micro_batch_tokens is not None:
        overrides.append(f"train.micro_batch_tokens={int(args.micro_batch_tokens)}")
    try:
        cfg = TrainConfig.from_recipe(recipe, overrides)
    except ConfigError as e:
        raise TrainError(str(e)) from e
    data_dir = as_path(args.data)  # a folder, or an object-store URL (s3://...)
    if not (data_dir / MANIFEST).is_file() and (data_dir / f"stage{cfg.stage}").is_dir():
        data_dir = data_dir / f"stage{cfg.stage}"  # --data OUT as given to `ovis-data pack --out`
    try:
        manifest, manifest_path = read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from e
    if manifest.get("stage") != cfg.stage:
        raise TrainError(
            f"{manifest_path}: packed for stage {manifest.get('stage')}, training stage {cfg.stage}"
        )
    run_dir = Path(args.out) / f"stage{cfg.stage}"
    init_dir = None
    if args.init is not None or cfg.model["init"] == "previous":
        init_dir = (
            Path(args.init) if args.init is not None else Path(args.out) / f"stage{cfg.stage - 1}" / "model"
        )
        if not (init_dir / "config.json").is_file():
            raise TrainError(
                f"{init_dir}: no model directory to start stage {cfg.stage} from "
                "(train the previous stage first, or pass --init DIR)"
            )
    else:
        for flag, path in (("--llm", args.llm), ("--vit", args.vit)):
            if path is None or not (Path(path) / "config.json").is_file():
                raise TrainError(
                    f"stage {cfg.stage} builds the model from a base LLM and a base ViT: {flag} "
                    + (f"{path} has no config.json" if path is not None else "is required")
                )
    for folder in (init_dir,) if init_dir is not None else (args.llm, args.vit):
        try:
            check_safetensors_only(Path(folder))
        except ValueError as e:
            raise TrainError(str(e)) from e
    check_resume(args, run_dir / "checkpoints", _zero_stage(cfg))
    try:
        check_shards(data_dir, manifest, manifest_path, hashes=args.verify_data)
    except DataCheckError as e:
        raise TrainError(str(e)) from e
    return Prepared(cfg, run_dir, data_dir, manifest, manifest_path, init_dir)


def check_resume(args: RunArgs, ckpt: Path, zero_stage: int) -> None:
    """Checkpoints without --resume would be overwritten; --resume without any would silently start over;
    ZeRO-3 checkpoints all from another number of ranks cannot be resumed (elastic.check_zero3_world)."""
    if not args.resume and (checkpoint.tags(ckpt) or (ckpt / "latest").is_file()):
        raise TrainError(
            f"{ckpt} holds checkpoints: pass --resume to continue that run, or use another --out"
        )
    if args.resume and not checkpoint.tags(ckpt):
        raise TrainError(
            f"--resume: no checkpoint in {ckpt} (looked for {checkpoint.TAG_PREFIX}K folders): is --out "
            "the run's folder? Without --resume the stage starts from step 0"
        )
    if args.resume and zero_stage == 3:
        try:
            check_zero3_world(ckpt, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's, before init
        except ElasticError as e:
            raise TrainError(str(e)) from e


def lock_run(run_dir: Path, say) -> RunLock | None:  # noqa: ANN001 - say: print-like
    """Rank 0 (as the launcher's RANK says, before any process group) holds the run folder's lock for
    the run's life; a second run into the same folder is refused naming the holder."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = RunLock(run_dir)
    try:
        lock.acquire(say)
    except RunLockedError as e:
        raise TrainError(str(e)) from e
    return lock


def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun / deepspeed launchers set RANK etc.; a plain `ovis-train` runs as a world of one."""
    from .opcache import extensions_dir, skip_cpu_comm_op

    extensions_dir()  # DeepSpeed's JIT-built ops go to this environment's cache (unless the user chose one)
    import deepspeed

    # DeepSpeed's ZeRO calls collectives torch deprecated: one warning per call would drown the progress line
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    cuda = torch.cuda.is_available()
    if not cuda:
        skip_cpu_comm_op()  # its only use is tensor-parallel inference: no minute of C++ build at first start
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def close_distributed() -> None:
    """Tear the process group down while Python is whole, at the end of a run. Left to the interpreter's
    exit, its C++ threads can outlive the objects they use and end the process in std::terminate
    ("terminate called without an active exception"), a rank's exit status then failing the launch.
    Through DeepSpeed, which drops its own handles on the groups too: a second run in the same process (a
    notebook, the tests) would otherwise meet a destroyed group in ZeRO's setup."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def build_model(prep: Prepared, args: RunArgs, dtype: torch.dtype | None = None) -> Ovis:
    """The stage's starting model in `dtype` (bf16 when training in bf16: DeepSpeed would cast it anyway,
    and loading it so halves host memory), checked against the manifest, the recipe's modules trainable."""
    from transformers.utils import logging as hf_logging

    from ..modeling import Ovis

    hf_logging.disable_progress_bar()
    cfg = prep.cfg
    torch.manual_seed(cfg.train["seed"])  # stage 1's fresh head and VTE, the re-initialised ViT block
    attn = cfg.model["attn_implementation"]
    if attn == "auto":  # packed micro-batches: never the dense L x L mask (ovis_model.attention)
        attn = default_attn_implementation("cuda" if torch.cuda.is_available() else "cpu")
    if prep.init_dir is None:
        model = Ovis.from_parts(
            llm=args.llm,
            vit=args.vit,
            visual_vocab_size=cfg.model["visual_vocab_size"],
            re_init_layers=cfg.model["re_init_layers"],
            attn_implementation=attn,
            dtype=dtype,
        )
    elif _zero_stage(cfg) == 3:
        # built and loaded partition by partition (zero.Init through transformers' DeepSpeed integration):
        # no rank ever holds the whole model. Unset right after, so later loads in this process are plain.
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        ds = json.loads(Path(cfg.deepspeed).read_text(encoding="utf-8"))
        ds.update(train_micro_batch_size_per_gpu=1, bf16={"enabled": dtype == torch.bfloat16})
        keep = HfDeepSpeedConfig(ds)  # noqa: F841 - transformers holds only a weak reference to it
        try:
            model = Ovis.from_pretrained(prep.init_dir, attn_implementation=attn, dtype=dtype)
        finally:
            unset_hf_deepspeed_config()
    else:
        model = Ovis.from_pretrained(prep.init_dir, attn_implementation=attn, dtype=dtype)
    try:
        check_manifest(prep.manifest, prep.manifest_path, model)
        select_trainable(model, cfg.trainable, logger=log)
        model.sync_visual_forward = visual_sync_mode(model, _zero_stage(cfg))
    except (ContractError, ValueError) as e:
        raise TrainError(f"{cfg.recipe}: {e}" if not isinstance(e, ContractError) else str(e)) from e
    if cfg.train["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    if model.attn_implementation == "flex_attention":
        log_recompiles()
    return model


def _zero_stage(cfg: TrainConfig) -> int:
    ds = json.loads(Path(cfg.deepspeed).read_text(encoding="utf-8"))
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def trainable_rows(model: Ovis) -> list[tuple[str, int, int]]:
    """(part, trained parameters, all parameters) for the parts a recipe can name (full sizes also after
    ZeRO-3 has partitioned them)."""
    vt = model.visual_tokenizer
    parts = {"llm": model.llm, "visual_tokenizer.backbone": vt.backbone, "visual_tokenizer.head": vt.head}
    parts["vte"] = model.vte

    def size(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    return [
        (name, sum(size(p) for p in m.parameters() if p.requires_grad), sum(size(p) for p in m.parameters()))
        for name, m in parts.items()
    ]


def write_module_table(model: Ovis, path: Path) -> None:
    """Every block / leaf module with its state (train, freeze, partial) and parameter count."""
    from ..trainable import module_states, unit_of

    sizes: dict[str, int] = {}
    for name, p in model.named_parameters():
        sizes[unit_of(name)] = sizes.get(unit_of(name), 0) + int(getattr(p, "ds_numel", p.numel()))
    lines = [f"{'state':8} {'parameters':>12}  module"]
    lines += [f"{state:8} {sizes[unit]:>12,}  {unit}" for unit, state in module_states(model).items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_loader(prep: Prepared, model: Ovis, rank: int, world: int) -> TrainLoader:
    cfg = prep.cfg
    tok = model.text_tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    try:
        dataset = PackedStage(
            prep.data_dir,
            micro_batch_tokens=cfg.micro_batch_tokens,
            image_processor=model.image_processor,
            num_visual_tokens=model.num_visual_tokens,
            seed=cfg.train["seed"],
            rank=rank,
            world_size=world,
            pad_token_id=pad,
            pad_to_multiple_of=pad_multiple(model.attn_implementation),  # few shapes for flex's compiler
            skip_bad_shards=cfg.train["skip_bad_shards"],
        )
    except ValueError as e:
        raise TrainError(str(e)) from e
    return TrainLoader(dataset, num_workers=cfg.train["num_workers"])


def check_memory(prep: Prepared, model: Ovis, device: torch.device, world: int, bf16: bool) -> None:
    """Refuse (TrainError) a micro-batch budget whose estimated memory exceeds what is available, on every
    rank at once (`train.memory_check = false` skips the estimate)."""
    from .loss import all_reduce_sum
    from .memory import check_fits

    cfg = prep.cfg
    if not cfg.train["memory_check"]:
        return
    problem = check_fits(
        model,
        cfg.micro_batch_tokens,
        device,
        dtype_bytes=2 if bf16 else 4,
        gradient_checkpointing=cfg.train["gradient_checkpointing"],
        world_size=world,
        zero_stage=_zero_stage(cfg),
        capacity=prep.manifest.get("capacity"),
    )
    if all_reduce_sum([float(problem is not None)], device)[0] > 0:
        raise TrainError(problem or "the micro-batch budget does not fit in another rank's memory")


def step_plan(prep: Prepared, loader: TrainLoader, world: int) -> StepPlan:
    m = prep.manifest
    samples_per_record = m["samples"] / max(m["records"], 1)
    summary = loader.dataset.plan(0).summary
    per_mb = samples_per_record * summary["records"] / max(summary["micro_batches"], 1)
    try:
        return plan_steps(prep.cfg, summary["micro_batches"], per_mb, world)
    except ConfigError as e:
        raise TrainError(str(e)) from e


def build_engine(prep: Prepared, model: Ovis, plan: StepPlan, world: int, bf16: bool) -> tuple[Any, dict]:
    import deepspeed
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    cfg = prep.cfg
    lr = _lr(cfg, model)
    ds_config = deepspeed_config(cfg, plan.grad_accum, world, lr, bf16)

    def scheduler(optimizer: Any) -> Any:
        if cfg.train["schedule"] == "cosine":
            return get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.steps)
        return get_constant_schedule_with_warmup(optimizer, plan.warmup_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config, lr_scheduler=scheduler
    )
    return engine, ds_config


def _lr(cfg: TrainConfig, model: Ovis) -> float:
    by_family = cfg.train["lr_by_family"]
    family = getattr(model.config, "conversation_template", None)
    return float(by_family.get(family, cfg.train["lr"]))
