"""DeepSpeed's JIT-built ops: this environment's own cache, and no build at all for a CPU run.

On a CPU, DeepSpeed's communication backend compiles a C++ op (`deepspeed_shm_comm`) at its first start:
about a minute of g++ (and a compiler and Python headers the machine may lack), into torch's extension
cache, `~/.cache/torch_extensions`, which every environment shares, so two environments (other torch or
DeepSpeed versions) rebuilt it in turn, and a build killed midway left a `lock` that every later start
waited on without a word. The op serves only `inference_all_reduce` (DeepSpeed's tensor-parallel
inference); training's collectives (gloo all-reduce, reduce-scatter, all-gather) go through
torch.distributed. So a CPU run skips it (`skip_cpu_comm_op`): nothing is built, nothing waited on.
Any op DeepSpeed does build (a GPU optimizer a user's config asks for) goes to `TORCH_EXTENSIONS_DIR` if
set, else a folder inside this environment.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"


def extensions_dir() -> Path:
    """The cache in use: the user's TORCH_EXTENSIONS_DIR, else this environment's own (set for torch)."""
    if not os.environ.get(ENV):
        os.environ[ENV] = str(Path(sys.prefix) / "var" / "torch_extensions")
    return Path(os.environ[ENV])


def skip_cpu_comm_op() -> bool:
    """Make DeepSpeed's communication backend start without its shared-memory op (call before
    `deepspeed.init_distributed`). False where this DeepSpeed has another layout: it then builds as it
    would (the run still works, after the build)."""
    try:  # by module path: `from deepspeed.comm import torch` is the torch package deepspeed.comm imports
        ds_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return False
    if not callable(getattr(ds_comm, "build_shm_op", None)):
        return False
    # TorchBackend.__init__ looks the builder up in its module at call time; None is its "no op" value
    ds_comm.build_shm_op = lambda: None
    return True
