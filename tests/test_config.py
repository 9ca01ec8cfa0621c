"""Typed configs: recipes load, overrides apply, and every bad value is named in one error."""

from __future__ import annotations

from pathlib import Path

import pytest

from loretta.config import load_config
from loretta.configlib import recipe_names
from loretta.dsconfig import resolve_ds_config
from loretta.errors import ConfigError


def test_every_shipped_recipe_loads() -> None:
    names = recipe_names()
    assert "tiny" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.run.steps >= 1 and cfg.data.sources


def test_dotted_overrides_and_yaml_numbers() -> None:
    cfg = load_config(
        "tiny",
        [
            "--optim.lr=3e-4",
            "model.dim=128",
            "--data.sources.0.weight=2",
            "--model.sliding_window=null",
            "--optim.betas=[0.9, 0.99]",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.dim == 128 and cfg.data.sources[0].weight == 2.0
    assert cfg.optim.betas == [0.9, 0.99] and cfg.model.sliding_window is None


def test_yaml_file_with_base(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("base: tiny\nrun:\n  steps: 7\nmodel:\n  n_layers: 3\n")
    cfg = load_config(str(f))
    assert cfg.run.steps == 7 and cfg.model.n_layers == 3 and cfg.model.dim == 64


BAD = [
    ("--optim.lr=-1", "optim.lr"),
    ("--model.dim=65", "model.dim"),
    ("--model.n_kv_heads=3", "model.n_kv_heads"),
    ("--model.attn_backend=flash", "model.attn_backend"),
    ("--data.seq_len=4", "data.seq_len"),
    ("--data.micro_batch_size=0", "data.micro_batch_size"),
    ("--data.sources.0.weight=0", "data.sources.0.weight"),
    ("--run.steps=0", "run.steps"),
    ("--optim.betas=[0.9]", "optim.betas"),
    ("--checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("--logging.interval=0", "logging.interval"),
    ("--model.sliding_window=0", "model.sliding_window"),
    ("--optim.warmup_steps=1000", "optim.warmup_steps"),
    ("--run.precision=fp8", "run.precision"),
    ("--model.dimm=64", "model.dimm"),  # unknown field, with a suggestion
    ("--data.on_error=ignore", "data.on_error"),
    ("--model.rope_theta=abc", "model.rope_theta"),
    ("--faults.max_nan_skips=-2", "faults.max_nan_skips"),
    ("--engine.timeout_s=0", "engine.timeout_s"),
    ("--data.sources.0.name=", "data.sources.0.name"),
    ("--data.plan_chunk_rows=0", "data.plan_chunk_rows"),
    ("--data.plan_fill=1.2", "data.plan_fill"),
]


@pytest.mark.parametrize(("override", "field"), BAD)
def test_bad_value_is_named(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    msg = str(e.value)
    assert field in msg, msg
    hints = ("must", "expected", "unknown", "exceeds", "choose", "need", "empty", "use")
    assert any(word in msg for word in hints), msg


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["--optim.lr=0", "--model.dim=65", "--run.steps=0"])
    msg = str(e.value)
    assert len(e.value.problems) >= 3
    assert all(f in msg for f in ("optim.lr=0", "model.dim=65", "run.steps=0"))
    assert "did you mean model.dim" in str(_err("--model.dimm=1"))


def _err(override: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    return e.value


def test_unknown_recipe_lists_the_recipes() -> None:
    msg = str(_err_source("tinny"))
    assert "tiny" in msg and "no recipe" in msg


def _err_source(src: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_config(src)
    return e.value


def test_deepspeed_json_takes_numbers_from_our_config(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["--optim.grad_accum_steps=2", "--run.precision=bf16"])
    ds = resolve_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.micro_batch_size
    assert ds["train_batch_size"] == cfg.data.micro_batch_size * 2 * 4
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    off = resolve_ds_config(load_config("tiny", ["--engine.deepspeed_config=zero3_offload"]), 2)
    assert off["optimizer"]["params"]["lr"] == cfg.optim.lr


def test_conflicting_deepspeed_value_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "ds.json"
    f.write_text(
        '{"zero_optimization": {"stage": 3}, "gradient_clipping": 5.0, '
        '"train_micro_batch_size_per_gpu": 8, "scheduler": {"type": "WarmupLR"}}'
    )
    cfg = load_config("tiny", [f"--engine.deepspeed_config={f}"])
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(cfg, 2)
    msg = str(e.value)
    assert "gradient_clipping=5.0 conflicts with optim.grad_clip=1.0" in msg
    assert "scheduler" in msg
    assert "train_micro_batch_size_per_gpu" not in msg  # equal values are fine


def test_compiled_blocks_turn_off_deepspeeds_zero3_linear(tmp_path: Path) -> None:
    """DeepSpeed's ZeRO-3 linear makes dynamo recompile every block (it guards on each weight's
    ds_id): with compiled blocks the resolved config turns it off, and a JSON that asks for it
    is an error naming the key, the value and the fix."""
    cfg = load_config("llama_1b")
    on = resolve_ds_config(cfg, 8, compiled=True)
    assert on["zero_optimization"]["memory_efficient_linear"] is False
    off = resolve_ds_config(cfg, 8, compiled=False)
    assert "memory_efficient_linear" not in off["zero_optimization"]  # DeepSpeed's default
    f = tmp_path / "ds.json"
    f.write_text('{"zero_optimization": {"stage": 3, "memory_efficient_linear": true}}')
    cfg = load_config("tiny", [f"--engine.deepspeed_config={f}", "--model.compile=true"])
    assert resolve_ds_config(cfg, 2)["zero_optimization"]["memory_efficient_linear"] is True
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(cfg, 2, compiled=True)
    msg = str(e.value)
    assert "memory_efficient_linear=True" in msg and "model.compile=false" in msg and str(f) in msg
    f.write_text('{"zero_optimization": {"stage": 3, "memory_efficient_linear": "auto"}}')
    cfg = load_config("tiny", [f"--engine.deepspeed_config={f}"])
    assert (
        resolve_ds_config(cfg, 2, compiled=True)["zero_optimization"]["memory_efficient_linear"]
        is False
    )
    assert "memory_efficient_linear" not in resolve_ds_config(cfg, 2)["zero_optimization"]


@pytest.mark.parametrize("name", ["zero3", "zero3_offload", "zero3_nvme"])
def test_shipped_deepspeed_configs_parse_and_agree(name: str) -> None:
    cfg = load_config("tiny", [f"--engine.deepspeed_config={name}"])
    ds = resolve_ds_config(cfg, 2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_one_node_deepspeed_config_and_the_1b_recipe() -> None:
    cfg = load_config("llama_1b")
    ds = resolve_ds_config(cfg, 8)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] is True
    assert z["stage3_param_persistence_threshold"] >= 1e5  # norms stay resident
    assert ds["bf16"]["enabled"] is True
    m = cfg.model
    assert 1.05e9 < m.num_params() < 1.15e9 and cfg.data.seq_len == 2048
