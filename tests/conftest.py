"""Shared fixtures: the demo corpus (built once per run, shared by its test processes), a CLI runner (a
real process) and `call` (a program's entry point in this process, for the bad-input checks: each CLI keeps
one real-process check of its error line, the rest skip the ~2-10 s of imports a process pays)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the workers share the cores (one more worker than cores): one thread each and in each process they
    # start (set before torch is imported here); the trainer's own processes run with one already
    # (test_train.train_env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from ovis_data.demo_corpus import build_demo_corpus  # noqa: E402 - after the thread count
from ovis_data.fetch import serve_directory  # noqa: E402

# Test modules by their measured time (a per-worker timeline of `python -m pytest`), heaviest first: xdist
# hands whole modules to its workers in collection order (--no-loadscope-reorder, pyproject.toml), so the
# long ones start first and the short ones fill the gaps at the end (a long module collected last would keep
# one worker busy alone while the others idle).
HEAVY_FIRST = (
    "test_elastic.py", "test_train.py", "test_ray.py", "test_cli.py", "test_pack.py", "test_validation.py",
    "test_train_faults.py", "test_get.py", "test_loader.py", "test_object_storage.py", "test_report.py",
    "test_model_memory.py", "test_careless_user.py", "test_validate.py", "test_runner.py",
    "test_model_deepspeed.py", "test_serve.py", "test_fetch_cli.py", "test_fetch_resume.py",
    "test_fetch_faults.py", "test_model_persistence.py", "test_packing.py", "test_tokenizer_identity.py",
    "test_eval.py", "test_templates.py",
)  # fmt: skip


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject.toml): a worker per core and one more. Tests wait ~15% of their time (a process
    starting, a server answering, a rank at a barrier): on 2 cores, 3 workers ran the suite in 6:13 where 2
    took 6:52 (the same commit, one after the other). More than 8 would wait on the longest modules."""
    return min(len(os.sched_getaffinity(0)) + 1, 8)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    # a stable sort: the order within a module is kept
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))


def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder this run's test processes share: xdist gives each worker a basetemp below the run's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def first_builds(folder: Path) -> Iterator[bool]:
    """Held while one test process of the run decides whether to build `folder` (True: it is the first and
    builds it inside the block; a build that raised is started again by the next) or to use it (False)."""
    from filelock import FileLock

    done = folder / ".built"
    with FileLock(f"{folder}.lock"):
        first = not done.exists()
        if first and folder.exists():
            shutil.rmtree(folder)
        yield first
        if first:
            done.touch()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly generated demo corpus, built once per run (~9 s) and read by every test process.
    Read-only: tests that write catalogs must copy it or use catalog_out."""
    folder = run_folder(tmp_path_factory) / "demo"
    with first_builds(folder) as first:
        if first:
            build_demo_corpus(folder / "data", seed=0)
    return folder / "data"


@pytest.fixture(scope="session")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny LLM and ViT (28 px images) whose tokenizer is a real byte-level BPE with Llama 3's special
    tokens and a 600-token vocabulary: the LM head of a 151k vocabulary would be ~90% of each CPU step (the
    demo trains with the real Qwen2.5 tokenizer). (llm, vit), built once per run; read-only."""
    folder = run_folder(tmp_path_factory) / "tiny_parts"
    with first_builds(folder) as first:
        if first:
            from test_templates_tokenizers import llama3_tokenizer, save

            from ovis_model.tiny import write_tiny_parts

            write_tiny_parts(folder, image_size=28, tokenizer_dir=save(llama3_tokenizer(), folder / "tok"))
    return folder / "llm", folder / "vit"


@pytest.fixture(scope="session")
def packed(demo_root: Path, parts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stages 1-3 of the demo corpus packed for the tiny model (6 visual tokens, 28 px images, 256-token
    sequences, 4 a shard) with the tokenizer of its LLM folder, as users pack with their LLM's: OUT, with
    OUT/stageN. Built once per run; read-only. The data root it was packed from (validated, its catalogs
    written) is OUT/../data."""
    folder = run_folder(tmp_path_factory) / "tiny_packed"
    with first_builds(folder) as first:
        if first:
            from ovis_data.pack.stage import pack_stage

            shutil.copytree(demo_root, folder / "data")
            settings = dict(processes=1, packs_per_shard=4, visual_tokens=6, image_size=28, max_length=256)
            for stage in (1, 2, 3):
                pack_stage(stage, folder / "data", parts[0], folder / "packed", **settings)
    return folder / "packed"


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `ovis-data` as a user would (a real process, real exit status)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("OVIS_DATA_ROOT", None) if env is None or "OVIS_DATA_ROOT" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "ovis_data", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The demo corpus with its URL datasets' images on a local HTTP server, built once per run (~9 s).
    Its URLs name one port: each test process serves the same files on it (SO_REUSEPORT), so the URLs
    answer while any of them runs. Read-only: tests copy what they write into."""
    folder = run_folder(tmp_path_factory) / "corpus"
    with contextlib.ExitStack() as serving:
        with first_builds(folder) as first:
            if first:
                (folder / "served").mkdir(parents=True)
                url = serving.enter_context(serve_directory(folder / "served", reuse_port=True))
                build_demo_corpus(folder / "data", seed=0, url_root=folder / "served", base_url=url)
                (folder / "port").write_text(url.rsplit(":", 1)[1])
            else:
                port = int((folder / "port").read_text())
                serving.enter_context(serve_directory(folder / "served", port=port, reuse_port=True))
        yield folder / "data"


def _main(prog: str) -> Callable[[], None]:
    if prog == "ovis-data":
        from ovis_data.cli import main
    elif prog == "ovis-train":
        from ovis_model.train.cli import main
    else:
        from ovis_model.chat_cli import main
    return main


def call(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, prog: str, *args: str
) -> tuple[int, str, str]:
    """`prog args` in this process, as its console script runs it: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [prog, *args])
    monkeypatch.delenv("OVIS_DATA_ROOT", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        _main(prog)()
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def pools_started(monkeypatch: pytest.MonkeyPatch, module: object) -> list[int]:
    """The sizes of the process pools `module` starts from now on (each pool still starts and runs)."""
    sizes: list[int] = []
    real = module.ProcessPoolExecutor

    def counted(n: int, **kwargs: object) -> object:
        sizes.append(n)
        return real(n, **kwargs)

    monkeypatch.setattr(module, "ProcessPoolExecutor", counted)
    return sizes


# the variables a one-rank `ovis-train` sets for its world of one (ovis_model/train/setup.py)
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def world_of_one() -> Iterator[None]:
    """A trainer's world of one in this process: no rank variables before (a test's run is not a rank of
    an earlier one), none and no process group after, as if its process had exited."""
    from ovis_model.train.setup import close_distributed

    for key in RANK_VARIABLES:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        close_distributed()  # a refused run leaves its group up, as its process would until it exits
        for key in RANK_VARIABLES:
            os.environ.pop(key, None)


def train_here(*args: str) -> subprocess.CompletedProcess:
    """`ovis-train args` in this process, for one-rank runs whose claim is not about the process (signals,
    ranks, exit at interpreter teardown, peak memory keep real ones): torch, DeepSpeed and transformers are
    imported once per test process instead of once per run, ~6 s of a 3-step run's ~7. On one thread, as
    the trainer's processes here run (test_train.train_env): its losses equal theirs bit for bit."""
    import torch

    from ovis_model.train.cli import main

    argv, threads, out, err = sys.argv, torch.get_num_threads(), io.StringIO(), io.StringIO()
    sys.argv = ["ovis-train", *args]
    torch.set_num_threads(1)
    code = 0
    try:
        with world_of_one(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as done:
        code = int(done.code or 0)
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["ovis-train", *args], code, out.getvalue(), err.getvalue())


def one_line_error(result: tuple[int, str, str], *named: str) -> str:
    """Exit status 2 and one `error: ...` line on stderr naming each of `named`, no traceback."""
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for needle in named:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
