#!/usr/bin/env bash
# One prepared GPU session (H100/H200): the GPU-marked tests and the GPU figures, in one go.
#   bash bench/gpu_check.sh            (assumes `pip install -e ".[dev]"` was done in .venv)
# Writes its logs to ${OUT:-gpu-check}/ and prints a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
# CUDA attention backends (varlen, flash_attn when installed), bf16 ZeRO-3 on NCCL
$py -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -n 30 | tee "$out/pytest_gpu.txt"
# decoder vs transformers on the GPU, bf16
$py bench/model_step.py --device cuda --dtype bfloat16 --dim 1024 --layers 8 --heads 16 \
  --kv-heads 8 --vocab 32000 --batch 8 --seq 1024 2>&1 | tail -n 3 | tee "$out/model_step_cuda.txt"
echo "done: logs in $out/"
