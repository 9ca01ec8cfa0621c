"""The loss weighs every loss token of the global batch alike, whatever rank and micro-batch it
falls in: (2 ranks x 1 micro-batch), (1 rank x 2 micro-batches) and (1 rank x one micro-batch
of twice the rows) take the same step, with LoReTTa's transitive documents (generated blocks
carry no loss, so micro-batches hold different numbers of loss tokens) present."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_overrides, torchrun

from loretta.checkpoint.load import open_source


@pytest.fixture(scope="module")
def abc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loretta.config import load_config
    from loretta.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("abc")
    for s in load_config("tiny_loretta").data.sources:
        assert s.synthetic is not None
        ensure_synthetic(root / s.name, s.synthetic)
    return root


def one_step(tmp: Path, data: Path, nproc: int, **more: Any) -> dict[str, torch.Tensor]:
    over = tiny_overrides(
        tmp,
        steps=1,
        data=data / "ab",
        **{
            # Adam's first update is g / (|g| + eps): a large eps keeps it close to linear in
            # the gradient, so that a token weighed differently shows in the parameters
            "optim.eps": 1e-3,
            "optim.lr": 0.05,
            "optim.warmup_steps": 0,
            "optim.grad_clip": 0,
            "optim.weight_decay": 0,
            "data.audit": "true",
            **more,
        },
    )
    torchrun(nproc, ["--config", "tiny_loretta", *over, f"--data.sources.1.path={data / 'bc'}"])
    audit = [
        json.loads(line)
        for f in sorted((tmp / "run" / "audit").glob("rank*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    # transitive documents are in the step
    assert any(blk[2] >= 0 for rec in audit for blocks in rec["blocks"] for blk in blocks)
    with open_source(tmp / "run") as src:
        return {n: t.detach().float().clone() for n, t in src.iter_ours()}


def test_the_same_global_batch_gives_the_same_step(tmp_path: Path, abc: Path) -> None:
    init = one_step(tmp_path / "zero", abc, 1, **{"optim.lr": 1e-12})
    ref = one_step(tmp_path / "w2", abc, 2)
    accum = one_step(tmp_path / "acc", abc, 1, **{"optim.grad_accum_steps": 2})
    wide = one_step(tmp_path / "wide", abc, 1, **{"data.micro_batch_size": 16})
    moved = max(float((ref[n] - init[n]).abs().max()) for n in ref)
    assert moved > 1e-3  # the step did something
    for name, other in (("1 rank x 2 micro-batches", accum), ("1 rank x 16 rows", wide)):
        worst = max(float((ref[n] - other[n]).abs().max()) for n in ref)
        assert worst < 1e-5 * max(1.0, moved) + 1e-6, (name, worst, moved)
