"""Real DeepSpeed ZeRO-3 on CPU over gloo, two processes: training works and shards."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, REPO, base_env, losses, metrics, tiny_overrides, torchrun


def test_two_process_zero3_loss_falls_and_checkpoints(tmp_path: Path, tiny_data: Path) -> None:
    res = torchrun(2, ["--config", "tiny", *tiny_overrides(tmp_path, steps=30, data=tiny_data)])
    # DeepSpeed's calls of deprecated torch.distributed functions used to warn on every step
    assert "`torch.distributed." not in res.stdout + res.stderr
    run = tmp_path / "run"
    loss = losses(run)
    assert sorted(loss) == list(range(1, 31))
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (28, 29, 30)) / 3
    assert last < 0.7 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    rec = next(m for m in metrics(run) if m.get("step") == 30 and "loss" in m)
    for key in (
        "loss/dir/a->b",
        "loss/dir/b->a",
        "loss/mod/a",
        "tokens_per_s",
        "tokens_per_s_per_device",
        "data_wait_frac",
        "packing_efficiency",
        "grad_norm",
        "lr",
        "data/mix/ab",
        "data_overflow_dropped",
    ):
        assert key in rec, key
    assert rec["mfu"] > 0 and rec["tokens_per_s"] > 0
    ck = run / "checkpoints" / "step_00000030"
    assert (run / "checkpoints" / "latest").read_text().strip() == ck.name
    assert json.loads((ck / "state.json").read_text())["complete"] is True
    ranks = sorted(p.name for p in (ck / "ds").glob("*model_states.pt"))
    assert len(ranks) == 2, ranks  # one partition file per rank
    assert (ck / "config.yaml").exists() and (ck / "layout.json").exists()


def test_parameters_are_partitioned_and_generation_keeps_the_fetch_trace(
    tmp_path: Path, tiny_data: Path
) -> None:
    over = tiny_overrides(tmp_path, data=tiny_data)
    torchrun(2, [str(tmp_path), *over], module=str(REPO / "tests" / "dist_probe.py"))
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    names = recs[0]["params"].keys()
    large = [n for n in names if recs[0]["params"][n]["numel"] >= 1000]
    assert len(large) >= 8
    for n in names:
        numel = recs[0]["params"][n]["numel"]
        held = [r["params"][n]["local"] for r in recs]
        # each rank holds its half (rounded up: DeepSpeed pads to equal partitions)
        assert all(h == -(-numel // 2) for h in held), (n, numel, held)
    total = sum(r["params"][n]["numel"] for r in recs[:1] for n in names)
    assert all(abs(r["bytes"]["params"] - 4 * total / 2) <= 4 * len(names) for r in recs)
    # generation swaps ZeRO-3's linear for torch's (same logits, bit for bit) and back after
    for r in recs:
        assert r["ds_linear_before"].startswith("deepspeed"), r["ds_linear_before"]
        assert r["torch_linear_in_generation"] and r["ds_linear_after"] and r["same_logits"], r
        # and leaves ZeRO-3's fetch trace complete: the next step prefetches and coalesces
        assert r["trace_complete"] == [True, True, True], r["trace_complete"]


def test_deepspeed_launcher(tmp_path: Path, tiny_data: Path) -> None:
    env = base_env()
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        env["MASTER_PORT"],
        "--module",
        "loretta.pretrain",
        "--config",
        "tiny",
        *tiny_overrides(tmp_path, steps=5, data=tiny_data, **{"optim.grad_accum_steps": 2}),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5]
    start = next(
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    )
    assert start["world_size"] == 2


def test_weight_decay_groups_skip_norms_and_embeddings() -> None:
    from loretta.engine import param_groups
    from loretta.model import Decoder, DecoderConfig

    m = Decoder(DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        "tok_embeddings.weight",
        "norm.weight",
        *(f"layers.{i}.{n}_norm.weight" for i in (0, 1) for n in ("attention", "ffn")),
    }
    assert "output.weight" in {names[id(p)] for p in decay["params"]}


def test_zero3_offload_trains_on_cpu(tmp_path: Path, tiny_data: Path) -> None:
    """deepspeed_configs/zero3_offload.json: parameters and optimizer in CPU memory, DeepSpeed's
    CPU Adam (compiled on first use: minutes on a fresh machine, then cached)."""
    over = tiny_overrides(
        tmp_path,
        steps=3,
        data=tiny_data,
        **{"optim.warmup_steps": 1, "engine.deepspeed_config": "zero3_offload"},
    )
    torchrun(2, ["--config", "tiny", *over])
    loss = losses(tmp_path / "run")
    assert sorted(loss) == [1, 2, 3] and all(v == v for v in loss.values())
    assert loss[3] < loss[1]  # the offloaded optimizer really updates the weights
    ck = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert len(list((ck / "ds").glob("*optim_states.pt"))) == 2


def test_untested_deepspeed_version_is_refused_with_the_range() -> None:
    import deepspeed

    from loretta.engine import check_deepspeed_version
    from loretta.errors import DependencyError

    check_deepspeed_version(deepspeed.__version__)  # the installed one is in the tested range
    check_deepspeed_version("0.16.0")
    for bad in ("0.20.0", "0.15.9", "1.0.0", "nightly"):
        with pytest.raises(DependencyError) as e:
            check_deepspeed_version(bad)
        assert f"deepspeed {bad} is installed" in str(e.value) and ">=0.16,<0.20" in str(e.value)


def _nvme_json(tmp_path: Path) -> Path:
    ds = json.loads((REPO / "deepspeed_configs" / "zero3_nvme.json").read_text())
    (tmp_path / "nvme").mkdir()
    for section in ("offload_optimizer", "offload_param"):
        ds["zero_optimization"][section]["nvme_path"] = str(tmp_path / "nvme")
    path = tmp_path / "nvme.json"
    path.write_text(json.dumps(ds))
    return path


def test_zero3_nvme_placeholder_path_is_refused_before_any_process_group(tiny_data: Path) -> None:
    from loretta.config import load_config
    from loretta.dist import DistInfo
    from loretta.errors import ConfigError
    from loretta.train.trainer import prepare

    cfg = load_config(
        "tiny",
        [f"--data.sources.0.path={tiny_data}", "--engine.deepspeed_config=zero3_nvme"],
    )
    with pytest.raises(ConfigError, match=r"nvme_path='/local_nvme' is not a writable folder"):
        prepare(cfg, DistInfo())


def test_zero3_nvme_trains_or_says_what_is_missing(tmp_path: Path, tiny_data: Path) -> None:
    """deepspeed_configs/zero3_nvme.json with nvme_path in a temp dir. NVMe offload needs
    DeepSpeed's async_io op, built against libaio (apt install libaio-dev): where libaio is
    missing (as on the CI image) the run must stop at once with our error, not deep inside
    deepspeed.initialize; where it is present, three real steps swap to the folder."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    over = tiny_overrides(
        tmp_path,
        steps=3,
        data=tiny_data,
        **{"optim.warmup_steps": 1, "engine.deepspeed_config": str(_nvme_json(tmp_path))},
    )
    if AsyncIOBuilder().is_compatible(verbose=False):
        torchrun(1, ["--config", "tiny", *over])
        assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
        assert any((tmp_path / "nvme").rglob("*.swp")), "nothing was swapped to the folder"
        return
    res = torchrun(1, ["--config", "tiny", *over], check=False)
    assert res.returncode != 0
    assert "needs DeepSpeed's async_io op" in res.stderr and "libaio-dev" in res.stderr
    assert "loretta: error:" in res.stderr and "zero3_offload" in res.stderr
    assert "deepspeed.initialize" not in res.stderr  # our check, not DeepSpeed's op loader
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training


@pytest.mark.gpu
def test_bf16_zero3_on_nccl(tmp_path: Path, tiny_data: Path) -> None:
    """GPU machines: bf16 ZeRO-3 over NCCL, one process per visible GPU (at most 2)."""
    import torch

    n = min(2, torch.cuda.device_count())
    env = base_env()
    env.pop("DS_ACCELERATOR")
    over = tiny_overrides(
        tmp_path, steps=20, data=tiny_data, **{"run.precision": "bf16", "run.device": "cuda"}
    )
    torchrun(n, ["--config", "tiny", *over], env=env)
    loss = losses(tmp_path / "run")
    assert loss[20] < 0.8 * loss[1]
    start = next(m for m in metrics(tmp_path / "run") if m.get("event") == "start")
    assert start["device"].startswith("cuda") and start["world_size"] == n
