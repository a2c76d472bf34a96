"""Shared fixtures: the demo corpus (built once per session) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ovis_data.demo_corpus import build_demo_corpus
from ovis_data.fetch import serve_directory


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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The demo corpus with its URL datasets' images on a local HTTP server (one per test module)."""
    base = tmp_path_factory.mktemp("corpus")
    served = base / "served"
    served.mkdir()
    with serve_directory(served) as url:
        yield build_demo_corpus(base / "data", seed=0, url_root=served, base_url=url)
