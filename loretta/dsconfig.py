"""Fill a DeepSpeed JSON from our config: one source of truth for every number.

The JSON files in deepspeed_configs/ describe *how* to shard (ZeRO stage, buckets, offload).
Batch sizes, clipping, precision and optimizer hyperparameters belong to TrainConfig: in the JSON
they must be absent or "auto"; any other value that disagrees with our config is an error
rather than a silent override. This module does not import deepspeed.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from loretta.config import TrainConfig
from loretta.errors import ConfigError

CONFIG_DIR_NAMES = ("deepspeed_configs",)


def config_dir() -> Path:
    """deepspeed_configs/ of the source checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "deepspeed_configs", here / "deepspeed_configs"):
        if cand.is_dir():
            return cand
    return here.parent / "deepspeed_configs"


def available() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.json"))


def read_ds_json(name_or_path: str) -> tuple[dict[str, Any], str]:
    p = Path(name_or_path)
    if not p.suffix:
        p = config_dir() / f"{name_or_path}.json"
    if not p.is_file():
        raise ConfigError(
            [
                f"engine.deepspeed_config={name_or_path!r}: no such file ({p}); use one of "
                f"{available()} or a path to a JSON file"
            ]
        )
    try:
        return json.loads(p.read_text()), str(p)
    except json.JSONDecodeError as e:
        raise ConfigError([f"{p}: invalid JSON ({e})"]) from e


def _own(
    ds: dict[str, Any], path: list[str], ours: Any, field: str, where: str, problems: list[str]
) -> None:
    """Set ds[path] = ours unless the JSON holds a different concrete value (then: problem)."""
    node = ds
    for k in path[:-1]:
        node = node.setdefault(k, {})
    key = path[-1]
    theirs = node.get(key, "auto")
    if theirs != "auto" and theirs != ours:
        problems.append(
            f"{where}: {'.'.join(path)}={theirs!r} conflicts with {field}={ours!r}; "
            f'remove it from the JSON or set it to "auto" (our config owns this value)'
        )
    node[key] = ours


def resolve_ds_config(
    cfg: TrainConfig, world_size: int, load_universal: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (raises ConfigError listing every conflict)."""
    template, where = read_ds_json(cfg.engine.deepspeed_config)
    ds = copy.deepcopy(template)
    problems: list[str] = []
    o, d = cfg.optim, cfg.data
    _own(
        ds,
        ["train_micro_batch_size_per_gpu"],
        d.micro_batch_size,
        "data.micro_batch_size",
        where,
        problems,
    )
    _own(
        ds,
        ["gradient_accumulation_steps"],
        o.grad_accum_steps,
        "optim.grad_accum_steps",
        where,
        problems,
    )
    global_batch = d.micro_batch_size * o.grad_accum_steps * world_size
    _own(ds, ["train_batch_size"], global_batch, "micro_batch*accum*world", where, problems)
    _own(ds, ["gradient_clipping"], o.grad_clip, "optim.grad_clip", where, problems)
    prec = cfg.run.precision
    _own(ds, ["bf16", "enabled"], prec == "bf16", "run.precision", where, problems)
    _own(ds, ["fp16", "enabled"], prec == "fp16", "run.precision", where, problems)
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        ds["optimizer"].setdefault("type", "AdamW")
        _own(ds, ["optimizer", "params", "lr"], o.lr, "optim.lr", where, problems)
        _own(ds, ["optimizer", "params", "betas"], list(o.betas), "optim.betas", where, problems)
        _own(ds, ["optimizer", "params", "eps"], o.eps, "optim.eps", where, problems)
        _own(
            ds,
            ["optimizer", "params", "weight_decay"],
            o.weight_decay,
            "optim.weight_decay",
            where,
            problems,
        )
        del params
    if "scheduler" in ds:
        problems.append(
            f"{where}: has a 'scheduler' section; the learning-rate schedule is owned by "
            "optim.schedule/warmup_steps/min_lr_ratio: remove the section"
        )
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        problems.append(f"{where}: zero_optimization.stage={stage!r}; use 1, 2 or 3 (3 for ZeRO-3)")
    if ds.get("checkpoint", {}).get("load_universal") not in (None, False):
        problems.append(
            f"{where}: checkpoint.load_universal is set automatically on resume; remove it"
        )
    if problems:
        raise ConfigError(problems, where)
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer", {})
    return off.get("device", "none") in ("cpu", "nvme")


def nvme_problems(ds: dict[str, Any], where: str = "engine.deepspeed_config") -> list[str]:
    """Offload to NVMe needs each nvme_path to be a writable folder (checked before any process
    group; the shipped zero3_nvme.json names /local_nvme, a placeholder)."""
    out = []
    zero = ds.get("zero_optimization", {})
    for section in ("offload_optimizer", "offload_param"):
        off = zero.get(section, {})
        if off.get("device") != "nvme":
            continue
        path = off.get("nvme_path")
        if not path or not os.path.isdir(path) or not os.access(path, os.W_OK):
            out.append(
                f"{where}: zero_optimization.{section}.nvme_path={path!r} is not a writable "
                "folder: copy deepspeed_configs/zero3_nvme.json, set nvme_path to a folder on a "
                "local NVMe drive, and pass the copy as --engine.deepspeed_config=PATH"
            )
    return out


def uses_nvme(ds: dict[str, Any]) -> bool:
    zero = ds.get("zero_optimization", {})
    return any(
        zero.get(s, {}).get("device") == "nvme" for s in ("offload_optimizer", "offload_param")
    )
