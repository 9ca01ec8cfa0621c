"""The trainer's parts: the learning-rate schedule and the callback hook (2-process run)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from helpers import REPO, metrics, tiny_overrides, torchrun

from loretta.config import load_config
from loretta.train.step import lr_at


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = load_config("tiny", ["--run.steps=100", "--optim.warmup_steps=10"])
    o = cfg.optim
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == o.lr / 10 and lrs[9] == o.lr
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert abs(lr_at(100, cfg) - o.lr * o.min_lr_ratio) < 1e-12


def test_callbacks_run_on_every_rank_and_their_metrics_are_logged(
    tmp_path: Path, tiny_data: Path
) -> None:
    over = tiny_overrides(
        tmp_path, steps=4, data=tiny_data, **{"optim.warmup_steps": 1, "logging.interval": 4}
    )
    torchrun(2, [str(tmp_path), *over], module=str(REPO / "tests" / "callback_probe.py"))
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"calls{rank}.json").read_text())
        assert calls == [{"step": s, "rank": rank, "world": 2} for s in (1, 2, 3, 4)]
    recs = [m for m in metrics(tmp_path / "run") if "event" not in m]
    # step 2 is no log step: the callback's metrics get a record of their own
    assert [(m["step"], "loss" in m) for m in recs] == [(2, False), (4, True)]
    assert recs[0]["cb/step"] == 2.0 and recs[0]["cb/ranks"] == 2.0
    # step 4 is a log step: merged with the step's metrics
    assert recs[1]["cb/step"] == 4.0 and "tokens_per_s" in recs[1]


def test_cpu_peak_is_measured_in_the_runs_precision() -> None:
    """A bf16 run's MFU is against a bf16 GEMM (an fp32 peak gave 411% on a CPU with bf16 dot
    products); a configured peak wins."""
    import torch

    from loretta.train.metrics import detect_peak_flops

    cpu = torch.device("cpu")
    p32, src32 = detect_peak_flops(cpu, 0.0, "fp32")
    p16, src16 = detect_peak_flops(cpu, 0.0, "bf16")
    assert src32 == "measured fp32 GEMM (this CPU)" and src16 == "measured bf16 GEMM (this CPU)"
    assert p32 > 1e8 and p16 > 1e8
    assert detect_peak_flops(cpu, 5e12, "bf16") == (5e12, "configured")
