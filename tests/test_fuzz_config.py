"""Bad configs, checked in one process with no process group: each case names the field and
the fix, and random mixtures of them report every problem at once."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loretta.config import load_config, memory_problems
from loretta.dsconfig import resolve_ds_config
from loretta.errors import ConfigError

# (override, the exact fragment the error must contain: field, value, fix)
CASES = [
    ("--optim.lr=.inf", "optim.lr=inf: expected a finite number (not inf or nan)"),
    ("--optim.lr=.nan", "optim.lr=nan: expected a finite number"),
    ("--optim.lr=5", "optim.lr=5.0: must be in (0, 1], e.g. 3e-4"),
    ("--optim.lr=0", "optim.lr=0.0: must be in (0, 1]"),
    ("--optim.grad_clip=.nan", "optim.grad_clip=nan: expected a finite number"),
    ("--optim.grad_clip=-1", "optim.grad_clip=-1.0: must be in [0, 1e6] (0 disables clipping)"),
    ("--engine.timeout_s=.inf", "engine.timeout_s=inf: expected a finite number"),
    ("--engine.timeout_s=1e12", "engine.timeout_s=1000000000000.0: must be in (0, 604800]"),
    ("--engine.timeout_s=0", "engine.timeout_s=0.0: must be in (0, 604800] seconds"),
    ("--optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0]: need two values in [0, 1)"),
    ("--optim.betas=[0.9, .nan]", "optim.betas.1=nan: expected a finite number"),
    ("--optim.betas=0.9", "optim.betas=0.9: expected a list"),
    ("--optim.eps=0", "optim.eps=0.0: must be in (0, 1e-3], e.g. 1e-8"),
    ("--optim.eps=0.5", "optim.eps=0.5: must be in (0, 1e-3]"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be in [0, 1], e.g. 0.1"),
    ("--optim.min_lr_ratio=2", "optim.min_lr_ratio=2.0: must be in [0, 1]"),
    ("--optim.grad_accum_steps=0", "optim.grad_accum_steps=0: must be in [1, 65536]"),
    ("--optim.warmup_steps=-1", "optim.warmup_steps=-1: must be >= 0"),
    ("--data.sources.0.weight=.inf", "data.sources.0.weight=inf: expected a finite number"),
    ("--data.sources.0.weight=-1", "data.sources.0.weight=-1.0: must be in (0, 1e6]"),
    ("--data.sequence.shuffle_prob=1.5", "data.sequence.shuffle_prob=1.5: must be in [0, 1]"),
    ("--data.sources.0.synthetic.noise=2", "synthetic.noise=2.0: must be a probability"),
    ("--objective.transitive_prob=-0.1", "objective.transitive_prob=-0.1: must be a probability"),
    ("--objective.generation.temperature=.inf", "generation.temperature=inf: expected a finite"),
    ("--model.dropout=1.0", "model.dropout=1.0: must be in [0, 1)"),
    ("--model.rope_theta=.nan", "model.rope_theta=nan: expected a finite number"),
    ("--model.norm_eps=1", "model.norm_eps=1.0: must be in (0, 1e-2], e.g. 1e-5"),
    ("--model.init_std=5", "model.init_std=5.0: must be in (0, 1], e.g. 0.02"),
    ("--model.dim=100000", "model.dim=100000: must be <= 65536"),
    ("--model.vocab_size=-3", "model.vocab_size=-3: must be >= 0 (0 = from data)"),
    ("--data.seq_len=100000000", "data.seq_len=100000000: must be in [8, 1048576]"),
    ("--data.micro_batch_size=1000000", "data.micro_batch_size=1000000: must be in [1, 65536]"),
    ("--data.num_workers=-1", "data.num_workers=-1: must be in [0, 256] (0 = main process)"),
    ("--logging.peak_flops=.inf", "logging.peak_flops=inf: expected a finite number"),
    ("--run.seed=-1", "run.seed=-1: must be in [0, 2**63)"),
    ("--run.steps=abc", "run.steps='abc': expected an integer"),
    ("--engine.zero_init=maybe", "engine.zero_init='maybe': expected true or false"),
    ("--checkpoint.interval=-5", "checkpoint.interval=-5: must be >= 0 (0 = only at the end)"),
    ("--checkpoint.verify=crc", "checkpoint.verify='crc': must be one of ['full', 'size']"),
    ("--faults.inject_nan_at=[0]", "faults.inject_nan_at=[0]: steps are 1-based"),
    ("--optim.lr", "override '--optim.lr': expected --section.field=value"),
    ("--data.sources.5.weight=1", "data.sources has no item 5"),
    ("--model.dimm=64", "model.dimm: unknown field; did you mean model.dim?"),
]


@pytest.mark.parametrize(("override", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_value_names_field_and_fix(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert fragment in str(e.value), str(e.value)
    assert len(e.value.problems) == 1, e.value.problems  # no knock-on noise


@pytest.mark.parametrize("seed", range(8))
def test_random_mixtures_report_every_problem_at_once(seed: int) -> None:
    rng = random.Random(seed)
    # one override per field: two bad values for one field would shadow each other
    by_field: dict[str, tuple[str, str]] = {}
    for o, frag in rng.sample(CASES, len(CASES)):
        by_field.setdefault(o.split("=")[0], (o, frag))
    picked = list(by_field.values())[: rng.randint(3, 6)]
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [o for o, _ in picked])
    msg = str(e.value)
    for _, frag in picked:
        assert frag in msg, (picked, msg)
    assert f"{len(e.value.problems)} problem(s)" in msg


def test_a_type_error_does_not_hide_the_others() -> None:
    bad = ["--run.steps=abc", "--optim.lr=0", "--model.dim=65", "--engine.timeout_s=.inf"]
    with pytest.raises(ConfigError) as e:
        load_config("tiny", bad)
    assert len(e.value.problems) == 4, e.value.problems
    assert str(e.value).startswith("4 problem(s)")


# ---- the DeepSpeed JSON, checked before any process group -----------------------------------
BASE = {"zero_optimization": {"stage": 3}}
DS_CASES = [
    (
        {"zero_optimization": {"stage": 3, "reduce_bucket_size": -1}},
        "zero_optimization.reduce_bucket_size=-1: must be a number >= 0",
    ),
    (
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}},
        "zero_optimization.offload_optimizer.device='gpu': must be one of ['cpu', 'nvme', 'none']",
    ),
    (
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
        "offload_param.device='nvme' needs nvme_path",
    ),
    (
        {"zero_optimisation": {"stage": 3}},
        "zero_optimisation: unknown key; did you mean 'zero_optimization'?",
    ),
    (
        {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 5e7}},
        "zero_optimization.stage3_prefetch_bucket_sise: unknown key; did you mean "
        "'stage3_prefetch_bucket_size'?",
    ),
    ({**BASE, "gradient_cliping": 1.0}, "gradient_cliping: unknown key; did you mean"),
    ({**BASE, "bf16": {"enable": True}}, "bf16.enable: unknown key; did you mean 'enabled'?"),
    (
        {"zero_optimization": {"stage": 3, "overlap_comm": "yes"}},
        "zero_optimization.overlap_comm='yes': must be true or false",
    ),
    ({"zero_optimization": 3}, "zero_optimization=3: must be an object"),
    (
        {
            "zero_optimization": {
                "stage": 3,
                "offload_optimizer": {"device": "cpu", "pin_memroy": 1},
            }
        },
        "offload_optimizer.pin_memroy: unknown key; did you mean 'pin_memory'?",
    ),
    ({**BASE, "frobnicate": 1}, "frobnicate: unknown key; remove it"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4; use 1, 2 or 3"),
]


@pytest.mark.parametrize(("ds", "fragment"), DS_CASES, ids=[f[:40] for _, f in DS_CASES])
def test_bad_deepspeed_json_names_key_and_fix(
    ds: dict[str, object], fragment: str, tmp_path: Path
) -> None:
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    cfg = load_config("tiny", [f"--engine.deepspeed_config={f}"])
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(cfg, 2)
    assert fragment in str(e.value), str(e.value)


def test_a_size_that_cannot_fit_is_refused_with_the_numbers() -> None:
    cfg = load_config("tiny", ["--data.seq_len=1048576", "--data.micro_batch_size=64"])
    cfg.model.vocab_size = 32000
    (msg,) = memory_problems(cfg, 2, 80 * 2**30, "GPU memory")
    assert msg.startswith("data.seq_len=1048576 x data.micro_batch_size=64 does not fit")
    assert "logits 64x1048576x32000 fp32 x2 = 16000.0 GiB" in msg
    assert "but 80.0 GiB is available (GPU memory)" in msg
    assert "lower data.seq_len or data.micro_batch_size" in msg
    tiny = load_config("tiny")
    tiny.model.vocab_size = 192
    assert memory_problems(tiny, 2, 1 * 2**30, "RAM") == []
    # a 7B-class Llama at 8 x 4096 in bf16 with activation checkpointing fits an 80 GiB GPU
    big = load_config(
        "tiny",
        [
            "--model.dim=4096",
            "--model.n_layers=32",
            "--model.n_heads=32",
            "--model.n_kv_heads=8",
            "--data.seq_len=4096",
            "--run.precision=bf16",
            "--engine.activation_checkpointing=true",
        ],
    )
    big.model.vocab_size = 32000
    assert memory_problems(big, 8, 80 * 2**30, "GPU memory") == []
