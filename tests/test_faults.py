"""NaN policies, a hung rank, zero.Init + activation checkpointing, and rank discovery."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import (
    losses,
    metrics,
    spawn_torchrun,
    tiny_overrides,
    torchrun,
    wait_for_step,
    worker_pids,
)

from loretta.dist import discover, slurm_tasks_per_node


def test_nan_is_skipped_by_policy(tmp_path: Path, tiny_data: Path) -> None:
    torchrun(
        2,
        [
            "--config",
            "tiny",
            *tiny_overrides(
                tmp_path, steps=8, data=tiny_data, **{"faults.inject_nan_at": "[3, 5]"}
            ),
        ],
    )
    rows = metrics(tmp_path / "run")
    skipped = [m for m in rows if m.get("event") == "skipped_nonfinite"]
    assert [m["step"] for m in skipped] == [3, 5] and skipped[-1]["skipped_total"] == 2
    ls = losses(tmp_path / "run")
    assert sorted(ls) == list(range(1, 9)) and all(math.isfinite(v) for v in ls.values())
    assert (tmp_path / "run" / "checkpoints" / "step_00000008").is_dir()


def test_nan_stops_by_policy(tmp_path: Path, tiny_data: Path) -> None:
    over = tiny_overrides(
        tmp_path,
        steps=8,
        data=tiny_data,
        **{"faults.inject_nan_at": "[2]", "faults.nan_policy": "stop"},
    )
    res = torchrun(2, ["--config", "tiny", *over], check=False)
    assert res.returncode != 0 and "exitcode  : 3" in res.stderr + res.stdout
    stop = [m for m in metrics(tmp_path / "run") if m.get("event") == "stopped"]
    assert (
        stop and "non-finite loss" in stop[0]["reason"] and "nan_policy=stop" in stop[0]["reason"]
    )
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing bad was saved


def test_too_many_skips_stop(tmp_path: Path, tiny_data: Path) -> None:
    over = tiny_overrides(
        tmp_path,
        steps=8,
        data=tiny_data,
        **{"faults.inject_nan_at": "[1, 2, 3]", "faults.max_nan_skips": 2},
    )
    res = torchrun(2, ["--config", "tiny", *over], check=False)
    assert res.returncode != 0
    assert (
        "more than faults.max_nan_skips=2"
        in next(m for m in metrics(tmp_path / "run") if m.get("event") == "stopped")["reason"]
    )


def test_hung_rank_ends_the_job_within_the_timeout(tmp_path: Path, tiny_data: Path) -> None:
    timeout = 15
    proc = spawn_torchrun(
        2,
        [
            "--config",
            "tiny",
            *tiny_overrides(tmp_path, steps=400, data=tiny_data, **{"engine.timeout_s": timeout}),
        ],
    )
    pids = worker_pids(proc, 2)
    wait_for_step(tmp_path / "run", 3, proc)
    os.kill(pids[1], signal.SIGSTOP)  # rank 1 stops answering: rank 0 blocks in a collective
    t0 = time.time()
    try:
        out, _ = proc.communicate(timeout=timeout + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.kill(pids[1], signal.SIGKILL)
        except ProcessLookupError:
            pass
    took = time.time() - t0
    assert proc.returncode != 0
    assert took < timeout + 45, f"took {took:.0f}s"
    assert "no training step finished" in out or "exitcode  : 4" in out or "Timed out" in out, out[
        -3000:
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_init_and_activation_checkpointing_train_identically(
    tmp_path: Path, tiny_data: Path, precision: str
) -> None:
    """zero.Init builds the parameters already partitioned; our per-name init inside a gather
    gives them the values of a normal build, and recomputing activations runs the same forward.
    So the losses are equal to the bit, in fp32 and in bf16. (They were not on CPUs without
    oneDNN fp16, where DeepSpeed 0.19.8's zero.Init ignored our dtype=float32 and built bf16
    weights for an fp32 run: step 1 gave exactly the bf16 run's loss. engine.build_model now
    lets zero.Init read the dtype from the config and checks it.)"""
    common = {"optim.warmup_steps": 2, "run.precision": precision}
    other_knobs = {"engine.zero_init": True}
    if precision == "fp32":
        other_knobs["engine.activation_checkpointing"] = True
    base, other = tmp_path / "base", tmp_path / "other"
    torchrun(2, ["--config", "tiny", *tiny_overrides(base, steps=6, data=tiny_data, **common)])
    torchrun(
        2,
        [
            "--config",
            "tiny",
            *tiny_overrides(other, steps=6, data=tiny_data, **common, **other_knobs),
        ],
    )
    a, b = losses(base / "run"), losses(other / "run")
    assert len(a) == 6 and a == b, (a, b)


# ---- rank discovery (pure functions of the environment) ----------------------------------------
def test_discover_torchrun() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
    }
    d = discover(env, [])
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher) == (
        3,
        8,
        1,
        2,
        "torchrun",
    )
    assert (d.master_addr, d.master_port) == ("n1", 1234)


def test_discover_deepspeed_launcher() -> None:
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29501",
    }
    d = discover(env, ["--local_rank=1", "--config", "tiny"])
    assert (d.rank, d.local_rank, d.local_world_size, d.launcher) == (1, 1, 2, "deepspeed")


def test_discover_slurm_srun() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_TASKS_PER_NODE": "2(x4)",
        "SLURM_JOB_ID": "4242",
        "MASTER_ADDR": "node1",
    }
    d = discover(env, [])
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (5, 8, 1, 2)
    assert d.master_addr == "node1" and d.master_port == 20000 + 4242 and d.launcher == "slurm"
    # inside an sbatch job that runs torchrun, torchrun's variables win
    both = dict(env, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    assert discover(both, []).launcher == "torchrun"


def test_slurm_tasks_per_node_parsing() -> None:
    assert slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        slurm_tasks_per_node("two")


def test_single_process_default() -> None:
    d = discover({}, [])
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "none")
