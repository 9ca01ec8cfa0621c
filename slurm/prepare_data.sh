#!/usr/bin/env bash
# slurm/prepare_data.sh - prepare a recipe's data sources before training, one array task each.
#
#   CONFIG=tiny sbatch --array=0 slurm/prepare_data.sh
#   CONFIG=my.yaml sbatch --array=0-3 slurm/prepare_data.sh     # a recipe with 4 sources
#   CONFIG=my.yaml sbatch slurm/prepare_data.sh                 # no array: every source in turn
#
# Array task i handles data.sources.i of the recipe: a source with a `synthetic:` section is
# written as shards (loretta.data.synthetic.ensure_synthetic; nothing to do if it is already
# there), then every source is opened with its checksums verified (a remote source is copied
# into the data cache on the way). A source built by its own tool (e.g.
# tools/build_svl_digits.py) must exist already; the task then fails with the reason.
# Env: CONFIG (recipe name or YAML path; default tiny), OVERRIDES (dotted overrides, space
# separated, e.g. "--data.sources.0.path=/scratch/tiny"), PYTHON (default: python).
#
#SBATCH --job-name=loretta-data
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

CONFIG=${CONFIG:-tiny}
PYTHON=${PYTHON:-python}
read -r -a overrides <<<"${OVERRIDES:-}"
# one sbatch without --array prepares every source
task=${SLURM_ARRAY_TASK_ID:-all}
echo "[prepare_data.sh] job ${SLURM_JOB_ID:-local} task $task on $(hostname): config $CONFIG" >&2

exec "$PYTHON" - "$CONFIG" "$task" "${overrides[@]}" <<'EOF'
import sys
from pathlib import Path

from loretta.config import load_config
from loretta.data.sources import open_dataset
from loretta.data.synthetic import ensure_synthetic, synthetic_folder
from loretta.errors import LorettaError

config, task, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    cfg = load_config(config, overrides)
    sources = cfg.data.sources
    ids = range(len(sources)) if task == "all" else [int(task)]
    for i in ids:
        if i >= len(sources):
            sys.exit(
                f"[prepare_data.sh] array task {i}: {config} has {len(sources)} data source(s); "
                f"submit with --array=0-{len(sources) - 1}"
            )
        s = sources[i]
        path = synthetic_folder(s.path) or s.path  # this script generates explicitly
        if s.synthetic is not None:
            ensure_synthetic(path, s.synthetic)
        cache = cfg.data.cache_dir or str(cfg.run.path / "cache")
        ds = open_dataset(path, cache, verify_checksums=True)
        print(f"[prepare_data.sh] data.sources.{i} ({s.name}): {path}: {len(ds)} samples, "
              f"modalities {ds.modality_names}, checksums OK", flush=True)
except LorettaError as e:
    sys.exit(f"[prepare_data.sh] error: {e}")
EOF
