#!/usr/bin/env bash
# slurm/pretrain.sh - pretrain on N nodes x G GPUs: one torchrun per node, started by srun.
#
#   CONFIG=svl_digits_large RUN_DIR=runs/svl sbatch --nodes=4 --gpus-per-node=8 slurm/pretrain.sh
#   CONFIG=tiny sbatch --nodes=2 slurm/pretrain.sh                 # CPU-only nodes
#   sbatch slurm/pretrain.sh --optim.lr=3e-4                       # extra args go to pretrain
#
# The #SBATCH lines below are defaults; sbatch flags override them. The run is chosen by the
# environment (sbatch passes the submitting shell's environment to the job):
#   CONFIG          recipe name or YAML path                         (default: tiny)
#   OVERRIDES       extra overrides, space separated: "--run.steps=1000 --optim.lr=3e-4"
#   RUN_DIR         run folder, passed as --run.run_dir              (default: runs/<job name>)
#   GPUS_PER_NODE   processes per node on GPU nodes  (default: the job's GPUs per node, or 0)
#   PROCS_PER_NODE  processes per node on CPU-only nodes (default: 1); also wins on GPU nodes
#   TORCHRUN        torchrun to start                                (default: torchrun)
#   MASTER_PORT     rendezvous port                    (default: 20000 + job id % 20000)
# Requeue: --signal=B:USR1@<secs> sends USR1 to this script <secs> before the time limit (or
# run `scancel --signal=USR1 --batch <jobid>` to preempt by hand). The script forwards it to
# the training processes, which checkpoint at the next step boundary; it then requeues the job,
# which resumes from the latest checkpoint (--resume auto). See docs/slurm.md.
# Test hook: LORETTA_SLURM_FAIL_NODE=<node index> makes that node's task exit 1 before training.
#
#SBATCH --job-name=loretta
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

log() { echo "[pretrain.sh $(date +%H:%M:%S)] $*" >&2; }

: "${SLURM_JOB_ID:?run this script with sbatch (or inside an salloc allocation)}"
CONFIG=${CONFIG:-tiny}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-loretta}}
TORCHRUN=${TORCHRUN:-torchrun}
read -r -a overrides <<<"${OVERRIDES:-}"

# --- processes per node ---------------------------------------------------------------------
# Slurm sets SLURM_GPUS_ON_NODE when the job has GPUs (--gpus-per-node, --gres=gpu:N, ...);
# SLURM_GPUS_PER_NODE holds --gpus-per-node as given, e.g. "8" or "h100:8".
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}
if [ "$GPUS_PER_NODE" -gt 0 ]; then
  NPROC=${PROCS_PER_NODE:-$GPUS_PER_NODE}
else
  NPROC=${PROCS_PER_NODE:-1}
  # tells loretta and DeepSpeed not to look for a GPU
  export DS_ACCELERATOR=cpu
fi

# --- rendezvous: the first node of the allocation, a port that only this job uses -----------
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
if ! getent hosts "$MASTER_ADDR" >/dev/null; then
  # node names are not in DNS on some clusters (and on the test cluster): use its NodeAddr
  MASTER_ADDR=$(scontrol show node "$MASTER_ADDR" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

# --- environment for every process ------------------------------------------------------------
# CPU threads per training process: the task's CPUs shared by its processes (1 if unknown).
cpus=${SLURM_CPUS_PER_TASK:-$NPROC}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / NPROC > 0 ? cpus / NPROC : 1))}
# srun in Slurm 22.05 does not inherit --cpus-per-task from sbatch; this makes it.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
# a failed NCCL collective raises (and ends the job) instead of hanging until the time limit
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
# torchrun with --signals-to-handle (torch 2.14 has it) then catches SIGUSR1 and forwards it to
# its workers; it waits this long for them to checkpoint and exit before it kills them (30 s
# by default).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
export LORETTA_SLURM_FAIL_NODE=${LORETTA_SLURM_FAIL_NODE:-}

# --- what each node runs (one srun task per node) --------------------------------------------
# It runs torchrun with SIGUSR1 ignored: a torchrun that does not handle USR1 (older torch)
# would otherwise die of it; newer torchrun installs its own handler, and the python workers
# install loretta's (loretta/train/faults.py). slurmstepd signals every process of the step,
# so the workers get USR1 directly as well as from torchrun. Workers that checkpointed exit 75,
# which torchrun reports as 1: after a stop signal this task exits 0, so that srun's
# --kill-on-bad-exit does not kill the other nodes while they are still finishing. Whether a
# checkpoint was written is decided below from the run's own record, not from exit codes.
# shellcheck disable=SC2016  # expanded by the task's bash, on its node
node_main='
set -u
tag="node $SLURM_NODEID ($SLURMD_NODENAME)"
if [ "$LORETTA_SLURM_FAIL_NODE" = "$SLURM_NODEID" ]; then
  echo "[pretrain.sh] $tag: LORETTA_SLURM_FAIL_NODE=$SLURM_NODEID (test hook): exiting 1 before training" >&2
  exit 1
fi
stop=""
trap "stop=USR1" USR1
trap "stop=TERM" TERM
echo "[pretrain.sh] $tag: starting torchrun (--node_rank=$SLURM_NODEID)" >&2
(trap "" USR1; exec "$1" --node_rank="$SLURM_NODEID" "${@:2}") &
pid=$!
while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
rc=0; wait "$pid" || rc=$?
if [ -n "$stop" ] && [ "$rc" != 0 ]; then
  echo "[pretrain.sh] $tag: torchrun exited $rc after SIG$stop; the task exits 0 (the batch script judges the stop)" >&2
  exit 0
fi
exit "$rc"
'

launch=(
  "$TORCHRUN" --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC"
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --max_restarts=0
  -m loretta.pretrain --config "$CONFIG" --run.run_dir="$RUN_DIR" --resume auto
  "${overrides[@]}" "$@"
)

# --- stop signals: ask the training to checkpoint, then requeue -------------------------------
# bash runs a trap only between foreground commands, so srun runs in the background and the
# script waits for it; a trap interrupts `wait`, which is then resumed.
stop=""
# shellcheck disable=SC2317  # called by the traps below
on_signal() {
  stop=$1
  if [ "$1" = USR1 ]; then
    log "got SIGUSR1: asking the training to checkpoint and stop"
    # srun passes USR1 on to its tasks (slurmstepd signals every process of the step)
    if [ -n "${srun_pid:-}" ]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi
  else
    # Slurm sends this SIGTERM to every process of the job (cancel, preemption, time limit),
    # training included, and SIGKILLs them KillWait seconds later. Another signal now would
    # make torchrun give up waiting for its workers to finish the checkpoint.
    log "got SIGTERM: the training got it too and checkpoints if it can within KillWait"
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# True if the checkpoint folder $1 holds the run's last step (loretta saves one at the end,
# checkpoint.save_final). Reads loretta's state.json and config.yaml; no python needed.
finished() {
  local step steps
  step=$(grep -o '"step": *[0-9]*' "$1/state.json" 2>/dev/null | grep -o '[0-9]*$') || return 1
  steps=$(awk '/^run:/ {r = 1; next} /^[^ ]/ {r = 0} r && $1 == "steps:" {print $2}' \
    "$1/config.yaml" 2>/dev/null) || return 1
  [ -n "$step" ] && [ "$step" = "$steps" ]
}

metrics=$RUN_DIR/metrics.jsonl
mkdir -p "$RUN_DIR"
# the run's metrics grow from here: events after this offset belong to this attempt
offset=$(stat -c %s "$metrics" 2>/dev/null || echo 0)
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $NPROC" \
  "process(es), master $MASTER_ADDR:$MASTER_PORT, config $CONFIG, run dir $RUN_DIR"

srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$node_main" node "${launch[@]}" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" || true; done
rc=0
wait "$srun_pid" || rc=$?

if [ -z "$stop" ]; then
  if [ "$rc" = 0 ]; then
    log "training finished"
  else
    log "FAILED: training exited with code $rc (a node's task failed; see the srun lines above)"
  fi
  exit "$rc"
fi

# Stopped by a signal. Judge from what loretta wrote (the 75 its processes exit with does not
# get through torchrun): the newest checkpoint, and the {"event": "preempted"} record that rank
# 0 appends to metrics.jsonl once the checkpoint is complete.
ckpt=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none)
if finished "$RUN_DIR/checkpoints/$ckpt"; then
  log "training finished: $ckpt is the last step (it ended before SIG$stop could stop it)"
  exit 0
fi
if tail -c "+$((offset + 1))" "$metrics" 2>/dev/null | grep -F '"event": "preempted"' >/dev/null; then
  if [ "$stop" = USR1 ]; then
    log "checkpointed ($ckpt) after SIGUSR1: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || {
      log "FAILED: scontrol requeue refused; submit the same command again to resume from $ckpt"
      exit 1
    }
  else
    log "checkpointed ($ckpt) after SIGTERM: not requeueing (Slurm requeues preempted jobs)"
  fi
  exit 0
fi
log "FAILED: no checkpoint was recorded after SIG$stop (exit code $rc); see the log above." \
  "Not requeueing: submit again to resume from $ckpt"
exit "$((rc == 0 ? 1 : rc))"
