#!/usr/bin/env bash
# One prepared GPU session (H100/H200): the GPU-marked tests and the GPU figures, in one go.
#   bash bench/gpu_check.sh
# Python: .venv/bin/python when this checkout has one (after `pip install -e ".[dev]"`), else
# python3 with the repo on PYTHONPATH; wheels in .whl/ (what a bare CUDA image lacks, fetched
# elsewhere by tools/gpu_wheels.sh) are installed to /tmp/site first, in one pip call, when present.
# Writes its logs to ${OUT:-gpu-check}/ and prints a summary; exits non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
if [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
  if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  # a --target install skips .pth files: nvidia-cutlass-dsl (flash-attn-4) puts its `cutlass`
  # package on sys.path through one
  if [[ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ]]; then
    export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
fail=0
steps=${STEPS:-all} # e.g. STEPS="pytest_gpu demo_smoke" runs only those
step() {  # step NAME CMD...: run, log to $out/NAME.txt, remember failures
  local name=$1
  shift
  [[ $steps == all || " $steps " == *" $name "* ]] || return 0
  echo "== $name: $*"
  local t0=$SECONDS
  # STEP_TIMEOUT (s) bounds each step, so that one hang still leaves the others' figures
  local lim=TIMEOUT_$name # e.g. TIMEOUT_pytest_gpu=120; else STEP_TIMEOUT; else an hour
  timeout --kill-after=15 "${!lim:-${STEP_TIMEOUT:-3600}}" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  tail -n 12 "$out/$name.txt"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || fail=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"

# the 1.1B Llama-style recipe (bf16 ZeRO-3, one GPU, packed 2048-token rows, compiled blocks,
# fused loss): MFU = tokens/s x (6N + 12·L·d·S) / peak (ANCHORS.md; N without the input
# embedding; peak 989e12 for H100/H200 bf16 dense)
run1b=/tmp/gpu-1b-run
rm -rf "$run1b"
step pretrain_mfu_1b $py -m torch.distributed.run --nproc_per_node=1 --master_port=29732 \
  -m loretta.pretrain --config llama_1b --run.run_dir="$run1b" \
  --data.sources.0.path=synthetic:/tmp/gpu-1b-data --run.device=cuda --run.steps=${STEPS_1B:-40} \
  --data.micro_batch_size=${MBS_1B:-16} --model.attn_backend=${ATTN_1B:-auto} \
  --optim.warmup_steps=5 --logging.interval=10 \
  --logging.wandb=disabled --logging.progress=never --checkpoint.interval=0 \
  --checkpoint.save_final=false
[[ -f $run1b/metrics.jsonl ]] && cp "$run1b/metrics.jsonl" "$out/pretrain_mfu_1b_metrics.jsonl"

# ZeRO-3 generation inside training on the GPU: naive, hooks + KV cache, gathered once + KV cache,
# host-sampled (before) and compiled decode, timed alike (median of repeats)
step transitive_generation_cuda $py bench/transitive_generation.py --device cuda --dim 1024 \
  --layers 8 --prompts 64 --new 196 --steps ${GEN_STEPS:-6} --repeats ${GEN_REPEATS:-3} --compile-decode

# CUDA attention backends (varlen; flash_attn when installed), fused-loss kernels, compiled
# blocks, on-device sampling, and bf16 ZeRO-3 over NCCL
step pytest_gpu $py -m pytest -m gpu -q -p no:cacheprovider tests/test_model.py tests/test_zero3.py \
  tests/test_loss.py tests/test_generate.py tests/test_compile.py

# decoder vs transformers on the GPU, bf16, one process (no DeepSpeed)
step model_step_cuda $py bench/model_step.py --device cuda --dtype bfloat16 --dim 2048 \
  --layers 8 --heads 16 --kv-heads 8 --vocab 32000 --batch 8 --seq 2048 --iters 10

# bf16 ZeRO-3 pretraining throughput and MFU: 8 x 2048-dim layers (~0.4B), packed 2048-token rows
run=/tmp/gpu-mfu-run
rm -rf "$run"
step pretrain_mfu $py -m torch.distributed.run --nproc_per_node=1 --master_port=29731 \
  -m loretta.pretrain --config tiny --run.run_dir="$run" --data.sources.0.path=synthetic:/tmp/gpu-mfu-data \
  --run.device=cuda --run.precision=bf16 --run.steps=40 --model.dim=2048 --model.n_layers=8 \
  --model.n_heads=16 --model.n_kv_heads=8 --data.seq_len=2048 --data.micro_batch_size=8 \
  --data.num_workers=2 --optim.lr=3e-4 --optim.warmup_steps=5 --logging.interval=10 \
  --logging.wandb=disabled \
  --logging.progress=never --checkpoint.interval=0
[[ -f $run/metrics.jsonl ]] && cp "$run/metrics.jsonl" "$out/pretrain_mfu_metrics.jsonl" &&
  $py - "$run/metrics.jsonl" <<'EOF' | tee -a "$out/pretrain_mfu.txt"
import json, sys
recs = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
start = next(r for r in recs if r.get("event") == "start")
last = [r for r in recs if "mfu" in r][-1]
keys = ("step", "loss", "tokens_per_s", "mfu", "step_time_s", "data_wait_frac",
        "packing_efficiency", "mem_gpu_gb")
print(json.dumps({**{k: last.get(k) for k in keys},
                  **{k: start.get(k) for k in ("device", "peak_flops", "peak_source")}}))
EOF

# README's first command on the GPU, scaled down (SVL data from SVL_DATA, built elsewhere if
# espeak-ng is missing here): three methods train on the GPU, evaluation, report
demo=/tmp/gpu-demo
rm -rf "$demo"
step demo_smoke $py -m loretta.demo.pipeline --preset smoke --out "$demo" \
  --data "${SVL_DATA:-data/svl-digits}" --logging.wandb=disabled
for f in summary.md metrics.json; do [[ -f $demo/report/$f ]] && cp "$demo/report/$f" "$out/demo_$f"; done
[[ -f $demo/loretta-seed0/metrics.jsonl ]] && grep -m1 '"event": "start"' "$demo/loretta-seed0/metrics.jsonl"

# a probe of the GPU preset in minutes (only when asked: STEPS=demo_gpu_probe): its 18 runs at
# ${STEPS_PROBE:-200} of 3,000 steps, nine at a time, on validation, with the image link ungated
# in every branch (a short run never opens the gate, a full run may: the costly case), then
# every run scored as the preset scores it. The report's meta splits data, training and
# evaluation time and projects the full preset's wall time (training in proportion to steps):
# does the preset fit its hour on this card? Time only: its accuracies say nothing about the
# gated preset (on validation the ungated image link lost image -> speech on a 902k-parameter
# model, docs/demo-results/README.md). Its data (14 x 14 x 16 SVL-digits) is built where
# its wheels install: loretta-demo --preset gpu --data-only --data "$SVL_DATA"
if [[ " $steps " == *" demo_gpu_probe "* ]]; then
  probe=/tmp/gpu-demo-probe
  rm -rf "$probe"
  step demo_gpu_probe $py -m loretta.demo.pipeline --preset gpu --split val \
    --steps "${STEPS_PROBE:-200}" --out "$probe" --data "${SVL_DATA:-data/svl-digits}" \
    --methods gpt,commutative,loretta_ungated,loretta_faithful_ungated,control_ungated,ceiling \
    --optim.warmup_steps=20 --logging.wandb=disabled
  for f in summary.md metrics.json; do
    [[ -f $probe/report/$f ]] && cp "$probe/report/$f" "$out/demo_gpu_probe_$f"
  done
fi

# the demo's GPU preset: every method and control over three fresh seeds on the test split
# (about an hour of one H100/H200, so only when asked: STEPS=demo_gpu bash bench/gpu_check.sh)
if [[ " $steps " == *" demo_gpu "* ]]; then
  step demo_gpu $py bench/demo.py --preset gpu --out /tmp/gpu-demo-full \
    --data "${SVL_DATA:-data/svl-digits}" --logging.wandb=disabled
  [[ -f /tmp/gpu-demo-full/report/summary.md ]] && cp /tmp/gpu-demo-full/report/summary.md "$out/demo_gpu_summary.md"
fi

echo "done: logs in $out/ (fail=$fail)"
# last line: the figures of this check as one JSON object (null where a step did not run)
$py bench/gpu_summary.py "$out"
exit $fail
