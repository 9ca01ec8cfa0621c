"""Surviving faults with real 2-process ZeRO-3 runs: kill -9 and resume bitwise, a crash in
the middle of a save, SIGUSR1 preemption, and resuming at a different world size."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    PY,
    base_env,
    losses,
    losses_after_last_start,
    metrics,
    reference_stream,
    spawn_torchrun,
    tiny_overrides,
    torchrun,
    wait_for_step,
    worker_pids,
)

STEPS = 20


def args(tmp: Path, data: Path, **more: Any) -> list[str]:
    o = {"checkpoint.interval": 5, "checkpoint.keep_last": 2, "data.audit": True}
    o.update(more)
    return ["--config", "tiny", *tiny_overrides(tmp, steps=STEPS, data=data, **o)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("reference")
    torchrun(2, args(tmp, tiny_data))
    ref = losses(tmp / "run")
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


def test_kill9_then_resume_auto_is_bitwise(
    tmp_path: Path, tiny_data: Path, reference: dict[int, float]
) -> None:
    kill_at = random.randint(6, 14)
    proc = spawn_torchrun(2, args(tmp_path, tiny_data))
    pids = worker_pids(proc, 2)
    wait_for_step(tmp_path / "run", kill_at, proc)
    os.kill(pids[random.randint(0, 1)], signal.SIGKILL)
    code = proc.wait(timeout=90)  # a dead rank ends the job (non-zero), it does not hang
    assert code != 0, f"killed at step >= {kill_at}"
    torchrun(2, [*args(tmp_path, tiny_data), "--resume", "auto"])
    resumed = losses_after_last_start(tmp_path / "run")
    start = min(resumed)
    assert start in (6, 11, 16), (kill_at, start)  # continued after the last checkpoint
    for s in range(start, STEPS + 1):
        assert resumed[s] == reference[s], (
            f"step {s} after kill at {kill_at}: {resumed[s]} != {reference[s]}"
        )


def test_crash_during_save_keeps_previous_checkpoint(
    tmp_path: Path, tiny_data: Path, reference: dict[int, float]
) -> None:
    res = torchrun(2, args(tmp_path, tiny_data, **{"faults.crash_in_save_at": "[10]"}), check=False)
    assert res.returncode != 0
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000005"
    assert (ck / ".step_00000010.tmp").exists() and not (ck / "step_00000010").exists()
    torchrun(2, [*args(tmp_path, tiny_data), "--resume", "auto"])
    resumed = losses_after_last_start(tmp_path / "run")
    assert min(resumed) == 6
    assert all(resumed[s] == reference[s] for s in range(6, STEPS + 1))
    assert not (ck / ".step_00000010.tmp").exists()  # the stale temp folder was cleaned up


def test_sigusr1_checkpoints_exits_75_and_resumes(
    tmp_path: Path, tiny_data: Path, reference: dict[int, float]
) -> None:
    a = args(tmp_path, tiny_data, **{"checkpoint.interval": 0, "logging.wandb": "offline"})
    proc = spawn_torchrun(2, a)
    pids = worker_pids(proc, 2)
    wait_for_step(tmp_path / "run", 7, proc)
    os.kill(pids[1], signal.SIGUSR1)  # one rank is enough: the flag is agreed across ranks
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "exitcode  : 75" in out, out[-3000:]
    events = [m for m in metrics(tmp_path / "run") if m.get("event") == "preempted"]
    assert len(events) == 1 and events[0]["exit_code"] == 75
    at = events[0]["step"]
    ck = tmp_path / "run" / "checkpoints" / f"step_{at:08d}"
    state = json.loads((ck / "state.json").read_text())
    assert state["complete"] and state["step"] == at
    torchrun(2, [*a, "--resume", "auto"])
    resumed = losses_after_last_start(tmp_path / "run")
    assert min(resumed) == at + 1
    assert all(resumed[s] == reference[s] for s in range(at + 1, STEPS + 1))
    # the resumed run logs into the same wandb run
    final = json.loads(
        (tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}" / "state.json").read_text()
    )
    assert final["wandb_id"] == state["wandb_id"]
    runs = sorted(p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(state["wandb_id"]) for r in runs)


def test_resume_at_another_world_size_repeats_and_skips_nothing(
    tmp_path: Path, tiny_data: Path
) -> None:
    from loretta.config import load_config

    first = args(tmp_path, tiny_data, **{"run.steps": 10, "checkpoint.interval": 0})
    torchrun(2, first)
    second = args(tmp_path, tiny_data, **{"run.steps": 14, "checkpoint.interval": 0})
    torchrun(4, [*second, "--resume", "auto"])
    assert (tmp_path / "run" / "checkpoints" / "step_00000010" / "universal").is_dir()
    consumed = []
    for f in sorted((tmp_path / "run" / "audit").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            consumed += [tuple(d) for d in json.loads(line)["docs"]]
    # reference: the global stream computed in one process
    cfg = load_config("tiny", tiny_overrides(tmp_path, data=tiny_data))
    stream = reference_stream(cfg)
    rows = 8 * (2 * 10 + 4 * 4)
    expect = [(d.source, d.sample, d.epoch) for _ in range(rows) for d in stream.next_row()]
    assert sorted(consumed) == sorted(expect)
    ls = losses_after_last_start(tmp_path / "run")
    assert sorted(ls) == [11, 12, 13, 14]
    start = next(m for m in reversed(metrics(tmp_path / "run")) if m.get("event") == "start")
    assert start["world_size"] == 4


def test_checkpoint_folder_is_self_describing(
    reference: dict[int, float], tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = next(p for p in Path(tmp_path_factory.getbasetemp()).glob("reference*/run"))
    ck = run / "checkpoints"
    kept = sorted(p.name for p in ck.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000015", "step_00000020"]  # keep_last=2
    last = ck / "step_00000020"
    state = json.loads((last / "state.json").read_text())
    for key in ("step", "tokens_seen", "world_size", "loader_state", "wandb_id", "complete"):
        assert key in state
    assert state["tokens_seen"] == STEPS * 2 * 8 * 128
    assert sorted(p.name for p in (last / "rng").iterdir()) == [
        "rank_00000.safetensors",
        "rank_00001.safetensors",
    ]
    assert (last / "config.yaml").exists() and (last / "layout.json").exists()
    manifest = json.loads((last / "manifest.json").read_text())["files"]
    assert "state.json" in manifest and "rng/rank_00001.safetensors" in manifest
    assert any(f.endswith("optim_states.pt") for f in manifest)


def test_a_checkpoint_with_another_layout_or_model_is_refused(tmp_path: Path) -> None:
    from loretta.config import load_config
    from loretta.data.format import atomic_write_json
    from loretta.errors import CheckpointError, DataError
    from loretta.train.checkpoint import check_compatible
    from loretta.vocab import VocabLayout

    cfg = load_config("tiny")
    cfg.model.vocab_size = 192
    ck = tmp_path / "step_00000010"
    ck.mkdir()
    (ck / "config.yaml").write_text(cfg.to_yaml())
    atomic_write_json(ck / "state.json", {"step": 10, "complete": True, "world_size": 2})
    saved = VocabLayout.build({"a": 64, "b": 64})
    atomic_write_json(ck / "layout.json", saved.to_dict())
    assert check_compatible(ck, cfg, saved)["step"] == 10
    with pytest.raises(DataError, match=r"vocabulary layout of checkpoint .* differs .*b: "):
        check_compatible(ck, cfg, VocabLayout.build({"a": 64, "b": 65}))
    other = load_config("tiny", ["--model.dim=128"])
    other.model.vocab_size = 192
    with pytest.raises(CheckpointError, match="model.dim: checkpoint 64 vs config 128"):
        check_compatible(ck, other, saved)


# ---- dropout: the RNG is part of the state -------------------------------------------------
DROP_STEPS = 10


def drop_args(tmp: Path, data: Path, **more: Any) -> list[str]:
    o = {"checkpoint.interval": 4, "checkpoint.keep_last": 2, "model.dropout": 0.1}
    o.update(more)
    return ["--config", "tiny", *tiny_overrides(tmp, steps=DROP_STEPS, data=data, **o)]


@pytest.fixture(scope="module")
def dropout_reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("dropout-reference")
    torchrun(2, drop_args(tmp, tiny_data))
    assert sorted(losses(tmp / "run")) == list(range(1, DROP_STEPS + 1))
    return tmp / "run"


def test_dropout_kill9_between_checkpoints_resumes_bitwise(
    tmp_path: Path, tiny_data: Path, dropout_reference: Path
) -> None:
    reference = losses(dropout_reference)
    proc = spawn_torchrun(2, drop_args(tmp_path, tiny_data))
    pids = worker_pids(proc, 2)
    wait_for_step(tmp_path / "run", 5, proc)  # past the step-4 checkpoint, before step 8's
    os.kill(pids[0], signal.SIGKILL)
    assert proc.wait(timeout=90) != 0
    torchrun(2, [*drop_args(tmp_path, tiny_data), "--resume", "auto"])
    resumed = losses_after_last_start(tmp_path / "run")
    assert min(resumed) in (5, 9)
    for s in range(min(resumed), DROP_STEPS + 1):  # dropout masks continue exactly
        assert resumed[s] == reference[s], (s, resumed[s], reference[s])


def test_damaged_newest_checkpoint_falls_back_and_resumes_bitwise(
    tmp_path: Path, tiny_data: Path, dropout_reference: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(dropout_reference, run)
    reference = losses(dropout_reference)
    newest = run / "checkpoints" / f"step_{DROP_STEPS:08d}"
    opt = sorted(newest.glob("ds/*optim_states.pt"))[-1]
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in the middle of the optimizer state
    opt.write_bytes(bytes(data))
    # named explicitly: exit 2 before any process group, naming the file
    res = subprocess.run(
        [PY, "-m", "loretta.pretrain", *drop_args(tmp_path, tiny_data), "--resume", str(newest)],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"{opt.relative_to(newest)}: contents changed" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    # --resume auto: reports it and resumes from step 8, the newest intact checkpoint
    out = torchrun(2, [*drop_args(tmp_path, tiny_data), "--resume", "auto"])
    assert f"checkpoint {newest} is damaged" in out.stderr, out.stderr[-3000:]
    assert "resuming from step_00000008" in out.stderr
    resumed = losses_after_last_start(run)
    assert sorted(resumed) == [9, 10] and all(resumed[s] == reference[s] for s in resumed)
