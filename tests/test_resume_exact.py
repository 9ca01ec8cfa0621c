"""Exact resume in every configuration that draws state outside the model: loader workers,
transitive generation, NaN-skipped steps. Each run is killed (kill -9) at a step that is not a
checkpoint step and resumed with --resume auto; every later loss equals the uninterrupted run's
bit for bit (2-process ZeRO-3 on the CPU)."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
from helpers import (
    losses,
    losses_after_last_start,
    metrics,
    spawn_torchrun,
    tiny_overrides,
    torchrun,
    wait_for_step,
    worker_pids,
)

STEPS, INTERVAL, KILL_AFTER = 10, 4, 5  # checkpoints at 4 and 8; killed once step 5 is logged

CASES = {
    # DataLoader worker processes materialise the rows (prefetching ahead of the step)
    "loader_workers": ("tiny", {"data.num_workers": 2}),
    # transitive documents: every step generates pseudo-modalities under one ZeRO-3 gather
    "transitive_generation": ("tiny_loretta", {"objective.transitive_prob": 0.5}),
    # skipped non-finite steps: the skip count and the skipped updates continue exactly
    "nan_skips": ("tiny", {"faults.inject_nan_at": "[3,6]", "faults.max_nan_skips": 5}),
}


def case_args(tmp: Path, data: Path, case: str) -> list[str]:
    recipe, more = CASES[case]
    o: dict[str, object] = {
        "checkpoint.interval": INTERVAL,
        "checkpoint.keep_last": 3,
        "optim.warmup_steps": 2,
        **more,
    }
    if recipe == "tiny_loretta":  # both sources, generated once for every run of the case
        o["data.sources.1.path"] = f"synthetic:{data / 'bc'}"
        o["data.sources.0.path"] = f"synthetic:{data / 'ab'}"
    else:
        o["data.sources.0.path"] = f"synthetic:{data / 'tiny'}"
    return ["--config", recipe, *tiny_overrides(tmp, steps=STEPS, **o)]


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("case", sorted(CASES))
def test_kill9_between_checkpoints_resumes_bitwise(
    case: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = tmp_path_factory.getbasetemp() / "resume-exact-data"
    ref_dir = tmp_path / "reference"
    torchrun(2, case_args(ref_dir, data, case))  # uninterrupted
    reference = losses(ref_dir / "run")
    assert sorted(reference) == list(range(1, STEPS + 1)), reference

    run_dir = tmp_path / "killed"
    proc = spawn_torchrun(2, case_args(run_dir, data, case))
    pids = worker_pids(proc, 2)
    wait_for_step(run_dir / "run", KILL_AFTER, proc)
    os.kill(pids[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    torchrun(2, [*case_args(run_dir, data, case), "--resume", "auto"])
    resumed = losses_after_last_start(run_dir / "run")
    start = min(resumed)
    assert start in (INTERVAL + 1, 2 * INTERVAL + 1), (case, start)  # not from scratch
    assert sorted(resumed) == list(range(start, STEPS + 1))
    for s in resumed:
        assert same(resumed[s], reference[s]), (case, s, resumed[s], reference[s])
    if case == "nan_skips":  # both runs skipped the same steps (the resumed one: step 6 again)
        for run in (ref_dir / "run", run_dir / "run"):
            skipped = {r["step"] for r in metrics(run) if r.get("event") == "skipped_nonfinite"}
            assert {3, 6} <= skipped, (run, skipped)
