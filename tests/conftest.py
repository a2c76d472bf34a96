"""Shared fixtures: the demo corpus (built once per session), a CLI runner (a real process) and `call`
(a program's entry point in this process, for the bad-input checks: each CLI keeps one real-process check
of its error line, the rest skip the ~2-10 s of imports a process pays)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the two cores: one thread each and in each process they start (set before torch is
    # imported here); the trainer's own processes run with one already (test_train.train_env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from ovis_data.demo_corpus import build_demo_corpus  # noqa: E402 - after the thread count
from ovis_data.fetch import serve_directory  # noqa: E402

# Test modules by their measured time (a per-worker timeline of `python -m pytest`), heaviest first: xdist
# hands whole modules to its workers in collection order (--no-loadscope-reorder, pyproject.toml), so the
# long ones start first and the short ones fill the gaps at the end (a long module collected last would keep
# one worker busy alone while the other idles).
HEAVY_FIRST = (
    "test_cli.py", "test_elastic.py", "test_train.py", "test_pack.py", "test_train_faults.py", "test_ray.py",
    "test_object_storage.py", "test_validation.py", "test_get.py", "test_loader.py", "test_report.py",
    "test_careless_user.py", "test_model_memory.py", "test_fetch_cli.py", "test_model_deepspeed.py",
    "test_serve.py", "test_validate.py", "test_runner.py", "test_fetch_resume.py", "test_packing.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    # a stable sort: the order within a module is kept
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly generated demo corpus; tests that write catalogs must copy or use catalog_out."""
    return build_demo_corpus(tmp_path_factory.mktemp("demo") / "data", seed=0)


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
    """The demo corpus with its URL datasets' images on a local HTTP server (one per test process; ~9 s to
    build). Read-only: tests copy what they write into."""
    base = tmp_path_factory.mktemp("corpus")
    served = base / "served"
    served.mkdir()
    with serve_directory(served) as url:
        yield build_demo_corpus(base / "data", seed=0, url_root=served, base_url=url)


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


def train_here(*args: str) -> subprocess.CompletedProcess:
    """`ovis-train args` in this process, for one-rank runs whose claim is not about the process (signals,
    ranks, exit at interpreter teardown, peak memory keep real ones): torch, DeepSpeed and transformers are
    imported once per test process instead of once per run, ~6 s of a 3-step run's ~7. Its rank variables
    and process group are gone afterwards, as they would be with the process."""
    from ovis_model.train.cli import main
    from ovis_model.train.setup import close_distributed

    for key in RANK_VARIABLES:
        os.environ.pop(key, None)
    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = ["ovis-train", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as done:
        code = int(done.code or 0)
    finally:
        sys.argv = argv
        close_distributed()  # a refused run leaves its group up, as its process would until it exits
        for key in RANK_VARIABLES:
            os.environ.pop(key, None)
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
