#!/usr/bin/env bash
# The Python packages bench/gpu_check.sh needs on a bare CUDA image (python3.12 with torch, no
# network), as wheels in .whl/: run this where pip reaches PyPI, take .whl/ along, and
# gpu_check.sh installs them to /tmp/site in ONE pip call. One call matters: the CuTe DSL wheels
# (flash-attn-4's compiler) share the folder nvidia_cutlass_dsl/, and `pip install --target
# --upgrade` run once per wheel keeps only the last wheel's part of it ("No module named
# 'cutlass.cute'", seen on an H200).
#   bash tools/gpu_wheels.sh [DEST]   # DEST: .whl by default; about 103 MB, 92 MB of it the
#                                     # CUDA 13 build of the CuTe DSL compiler
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
mkdir -p "$dest"
plat=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# DeepSpeed's needs beyond the CUDA image; the data path; the loss and attention kernels
$py -m pip download -q "${plat[@]}" -d "$dest" \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7 \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 \
  flash-attn-4==4.0.0b36 quack-kernels==0.6.5 apache-tvm-ffi==0.1.11 torch-c-dlpack-ext==0.1.5 \
  nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1
# DeepSpeed is an sdist: a pure-Python wheel, its ops left to JIT (DS_BUILD_OPS=0)
DS_BUILD_OPS=0 $py -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$dest"
ls "$dest"
du -sh "$dest"
