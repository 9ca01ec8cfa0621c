"""Fill a DeepSpeed JSON from our config: one source of truth for every number.

The JSON files in deepspeed_configs/ describe *how* to shard (ZeRO stage, buckets, offload).
Batch sizes, clipping, precision and optimizer hyperparameters belong to TrainConfig: in the JSON
they must be absent or "auto"; any other value that disagrees with our config is an error
rather than a silent override. This module does not import deepspeed.
"""

from __future__ import annotations

import copy
import json
import math
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


# Keys DeepSpeed 0.19 reads. DeepSpeed ignores a misspelled top-level key without a word and
# reports a bad nested one as a pydantic traceback after the process group is up; checking the
# JSON here names the key and the fix before anything starts.
TOP_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "dump_state",
    "memory_breakdown", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "communication_data_type", "seq_parallel_communication_data_type", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "optimizer", "scheduler",
    "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "data_types", "aio", "checkpoint",
    "activation_checkpointing", "flops_profiler", "comms_logger", "monitor_config",
    "tensorboard", "wandb", "csv_monitor", "comet", "elasticity", "autotuning",
    "compression_training", "data_efficiency", "curriculum_learning", "pipeline",
    "sparse_attention", "nebula", "weight_quantization", "compile", "timers",
    "graph_harvesting", "use_data_before_expert_parallelism", "dataloader_drop_last",
    "disable_allgather", "gradient_allreduce_op", "use_node_local_storage",
    "load_universal_checkpoint", "hybrid_engine", "eigenvalue", "quantize_training",
    "progressive_layer_drop", "mics_shard_size", "mics_hierarchical_params_gather",
    "zenflow", "tensor_parallel", "sequence_parallel_size",
}  # fmt: skip
ZERO_KEYS = {
    "stage", "allgather_partitions", "allgather_bucket_size", "reduce_scatter",
    "reduce_bucket_size", "overlap_comm", "contiguous_gradients", "offload_optimizer",
    "offload_param", "sub_group_size", "cpu_offload", "cpu_offload_param",
    "cpu_offload_use_pin_memory", "elastic_checkpoint", "load_from_fp32_weights",
    "round_robin_gradients", "ignore_unused_parameters", "legacy_stage1", "leaf_module",
    "prefetch_bucket_size", "stage3_prefetch_bucket_size", "param_persistence_threshold",
    "stage3_param_persistence_threshold", "model_persistence_threshold",
    "stage3_model_persistence_threshold", "max_live_parameters", "stage3_max_live_parameters",
    "max_reuse_distance", "stage3_max_reuse_distance", "gather_16bit_weights_on_model_save",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "use_all_reduce_for_fetch_params", "stage3_use_all_reduce_for_fetch_params",
    "allgather_sequential", "stage3_allgather_sequential", "module_granularity_threshold",
    "stage3_module_granularity_threshold", "zero_hpz_partition_size",
    "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "memory_efficient_linear", "pipeline_loading_checkpoint",
    "override_module_apply", "log_trace_cache_warnings", "enable_sanity_checks",
    "parameter_alignment", "compute_grad_norm", "use_multi_rank_bucket_allreduce",
    "save_muon_momentum_buffer_in_memory", "zenflow",
}  # fmt: skip
OFFLOAD_KEYS = {
    "offload_param": {"device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu",
                      "pin_memory"},
    "offload_optimizer": {"device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read",
                          "pipeline_write", "fast_init", "ratio", "cpuadam_cores_perc",
                          "super_offload"},
}  # fmt: skip
PRECISION_KEYS = {
    "bf16": {"enabled", "bf16_master_weights_and_grads", "bf16_optimizer_states",
             "check_grad_overflow", "immediate_grad_update"},
    "fp16": {"enabled", "auto_cast", "consecutive_hysteresis", "fp16_master_weights_and_grads",
             "hysteresis", "initial_scale_power", "loss_scale", "loss_scale_window",
             "min_loss_scale"},
}  # fmt: skip
# sizes in elements/parameters: a count, never negative
ZERO_SIZES = (
    "allgather_bucket_size", "reduce_bucket_size", "sub_group_size", "prefetch_bucket_size",
    "stage3_prefetch_bucket_size", "param_persistence_threshold",
    "stage3_param_persistence_threshold", "model_persistence_threshold",
    "stage3_model_persistence_threshold", "max_live_parameters", "stage3_max_live_parameters",
    "max_reuse_distance", "stage3_max_reuse_distance", "zero_hpz_partition_size",
)  # fmt: skip
ZERO_BOOLS = (
    "overlap_comm", "contiguous_gradients", "allgather_partitions", "reduce_scatter",
    "round_robin_gradients", "stage3_gather_16bit_weights_on_model_save",
)  # fmt: skip
OFFLOAD_DEVICES = ("cpu", "nvme", "none")


def _unknown(keys: Any, known: set[str], at: str, where: str) -> list[str]:
    import difflib

    out = []
    for k in keys:
        if k not in known:
            close = difflib.get_close_matches(str(k), sorted(known), n=1, cutoff=0.7)
            fix = f"did you mean {close[0]!r}?" if close else "remove it (DeepSpeed ignores it)"
            out.append(f"{where}: {at}{k}: unknown key; {fix}")
    return out


def _is_count(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def check_ds_json(ds: dict[str, Any], where: str) -> list[str]:
    """Problems of a DeepSpeed JSON before DeepSpeed sees it: unknown keys (with the close
    match), negative or non-numeric sizes, offload devices, wrong section types."""
    if not isinstance(ds, dict):
        return [f"{where}: the top level must be a JSON object"]
    out = _unknown(ds, TOP_KEYS, "", where)
    for sec, known in PRECISION_KEYS.items():
        node = ds.get(sec)
        if node is not None and not isinstance(node, dict):
            out.append(f'{where}: {sec}={node!r}: must be an object, e.g. {{"enabled": "auto"}}')
        elif node:
            out += _unknown(node, known, f"{sec}.", where)
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return [
            *out,
            f'{where}: zero_optimization={zero!r}: must be an object, e.g. {{"stage": 3}}',
        ]
    out += _unknown(zero, ZERO_KEYS, "zero_optimization.", where)
    for k in ZERO_SIZES:
        if k in zero and not _is_count(zero[k]):
            out.append(
                f"{where}: zero_optimization.{k}={zero[k]!r}: must be a number >= 0 "
                "(a count of elements, e.g. 5e7)"
            )
    for k in ZERO_BOOLS:
        if k in zero and not isinstance(zero[k], bool):
            out.append(f"{where}: zero_optimization.{k}={zero[k]!r}: must be true or false")
    for sec, known in OFFLOAD_KEYS.items():
        node = zero.get(sec)
        if node is None:
            continue
        at = f"zero_optimization.{sec}"
        if not isinstance(node, dict):
            out.append(f'{where}: {at}={node!r}: must be an object, e.g. {{"device": "cpu"}}')
            continue
        out += _unknown(node, known, f"{at}.", where)
        dev = node.get("device", "none")
        if dev not in OFFLOAD_DEVICES:
            out.append(
                f"{where}: {at}.device={dev!r}: must be one of {list(OFFLOAD_DEVICES)} "
                "(offload targets host memory or NVMe; the GPU is where it comes from)"
            )
        elif dev == "nvme" and not node.get("nvme_path"):
            out.append(f"{where}: {at}.device='nvme' needs nvme_path (a local NVMe folder)")
        for k in ("buffer_count", "buffer_size", "max_in_cpu"):
            if k in node and not _is_count(node[k]):
                out.append(f"{where}: {at}.{k}={node[k]!r}: must be a number >= 0")
    opt = ds.get("optimizer")
    if opt is not None and not (isinstance(opt, dict) and isinstance(opt.get("params", {}), dict)):
        out.append(f'{where}: optimizer={opt!r}: must be an object {{"type": ..., "params": {{}}}}')
    return out


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
    cfg: TrainConfig, world_size: int, load_universal: bool = False, compiled: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (raises ConfigError listing every conflict).
    `compiled`: the decoder's blocks run through torch.compile (model.compile resolved for the
    device, decoder.compile_enabled)."""
    template, where = read_ds_json(cfg.engine.deepspeed_config)
    problems = check_ds_json(template, where)
    if problems:  # the merge below assumes the sections are objects
        raise ConfigError(problems, where)
    ds = copy.deepcopy(template)
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
    mel = zero.get("memory_efficient_linear", "auto")
    if compiled and stage == 3:
        # ZeRO-3 swaps F.linear for its own autograd function (memory_efficient_linear), whose
        # backward reads each weight's ds_id: dynamo guards on it, so every block recompiles
        # until the recompile limit (8) and the blocks after it run eager (seen on an H200 with
        # torch 2.11: 8 of 22 layers compiled). Compiled blocks use torch's linear; the whole
        # block's weights are gathered for its forward and again for its backward anyway.
        if mel not in (False, "auto"):
            problems.append(
                f"{where}: zero_optimization.memory_efficient_linear={mel!r} cannot be used "
                f"with compiled blocks (model.compile={cfg.model.compile!r}): remove it from "
                'the JSON or set it to "auto", or set model.compile=false'
            )
        zero["memory_efficient_linear"] = False
    elif mel == "auto":
        zero.pop("memory_efficient_linear", None)  # DeepSpeed's default
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
