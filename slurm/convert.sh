#!/usr/bin/env bash
# slurm/convert.sh - export a checkpoint on one CPU node (ZeRO-3 partitions -> one model).
#
#   sbatch slurm/convert.sh runs/base/checkpoints/step_00010000 exports/base-hf
#   sbatch slurm/convert.sh runs/base exports/base.safetensors --to safetensors --dtype bf16
#   sbatch slurm/convert.sh SRC DST      # streams one parameter at a time: little memory needed
#
# Runs `python tools/convert_checkpoint.py SRC DST --to hf [more args]`; any --to given on the
# command line replaces the default. Needs no GPU. Env: PYTHON (default: python). Run it from
# the repository root (the job starts in the submit directory).
#
#SBATCH --job-name=loretta-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: sbatch slurm/convert.sh SRC DST [--to {safetensors,hf}] [more convert_checkpoint.py args]" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
src=$1 dst=$2
shift 2
to=(--to hf)
for a in "$@"; do
  case $a in --to | --to=*) to=() ;; esac
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
echo "[convert.sh] job ${SLURM_JOB_ID:-local} on $(hostname): $src -> $dst ${to[*]} $*" >&2
exec "$PYTHON" tools/convert_checkpoint.py "$src" "$dst" "${to[@]}" "$@"
