"""The training loop: thin orchestration of data, engine, objective, checkpoints and metrics.

    run(cfg, dist) -> exit code

Everything a user can get wrong (config, data, resume checkpoint, DeepSpeed JSON) is checked
before the process group is created.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loretta.config import TrainConfig, available_memory, memory_problems
from loretta.configlib import to_dict
from loretta.data.loader import build_loader, open_sources
from loretta.data.sequences import IGNORE, direction_names
from loretta.dist import DistInfo
from loretta.dsconfig import resolve_ds_config
from loretta.errors import ConfigError
from loretta.train import checkpoint as ckpt
from loretta.train import runlock
from loretta.train.faults import (
    EXIT_OK,
    EXIT_PREEMPTED,
    NanPolicy,
    SignalFlag,
    StopTraining,
    Watchdog,
)
from loretta.train.metrics import LossStats, MetricsLogger, detect_peak_flops


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup (linear from 0) then cosine/linear decay to lr * min_lr_ratio at run.steps."""
    o, total = cfg.optim, cfg.run.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    lo = o.lr * o.min_lr_ratio
    if o.schedule == "linear":
        return o.lr - (o.lr - lo) * frac
    return lo + 0.5 * (o.lr - lo) * (1 + math.cos(math.pi * frac))


def select_device(cfg: TrainConfig, info: DistInfo) -> torch.device:
    """Pick the device and tell DeepSpeed (before it is imported) which accelerator to use."""
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(["run.device='cuda' but no GPU is visible; use 'auto' or 'cpu'"])
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
        return torch.device("cuda", torch.cuda.current_device())
    os.environ["DS_ACCELERATOR"] = "cpu"
    return torch.device("cpu")


def check_memory(cfg: TrainConfig, device: torch.device, info: DistInfo) -> None:
    avail, source = available_memory(device.type, info.local_world_size)
    problems = memory_problems(cfg, info.world_size, avail, source)
    if problems:
        raise ConfigError(problems)


def finalize_model_config(cfg: TrainConfig, layout_size: int) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 64 * math.ceil(layout_size / 64)
    elif cfg.model.vocab_size < layout_size:
        raise ConfigError(
            [
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({layout_size} ids); set it to 0 (automatic) or >= {layout_size}"
            ]
        )


@dataclass
class Prepared:
    """Everything validated before a process group exists."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    layout: Any
    ds_config: dict[str, Any]
    resume_dir: Path | None
    resume_state: dict[str, Any] | None
    universal: bool
    objective: Any


def prepare(cfg: TrainConfig, info: DistInfo) -> Prepared:
    device = select_device(cfg, info)
    if cfg.run.precision == "fp16" and device.type == "cpu":
        raise ConfigError(["run.precision='fp16' needs a GPU; use 'bf16' or 'fp32' on the CPU"])
    _, layout = open_sources(cfg.data, cfg.run.seed)
    finalize_model_config(cfg, layout.size)
    check_memory(cfg, device, info)  # a size that cannot fit fails now, with the numbers
    resume_dir = ckpt.resolve_resume(cfg)
    state = ckpt.check_compatible(resume_dir, cfg, layout) if resume_dir else None
    if cfg.checkpoint.init_from and resume_dir is None:  # a bad export fails here, early
        from loretta.convert import check_init_source

        check_init_source(cfg.checkpoint.init_from, cfg.model, layout).close()  # headers only
    universal = bool(state and state.get("world_size") != info.world_size)
    ds_config = resolve_ds_config(cfg, info.world_size, load_universal=universal)
    from loretta.objectives import build_objective

    objective = build_objective(cfg, layout)  # link graph checked against the layout
    return Prepared(cfg, info, device, layout, ds_config, resume_dir, state, universal, objective)


def cross_entropy_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B*T,) losses in fp32 (0 where target is IGNORE)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )


def run(
    cfg: TrainConfig,
    info: DistInfo,
    dry_run: bool = False,
    objective: Any = None,
    signals: SignalFlag | None = None,
) -> int:
    _lock = runlock.hold_run_dir(cfg.run.path, info.rank)  # one job per run folder (rank 0)
    runlock.start_orphan_guard(info.launcher)  # no worker outlives its launcher
    p = prepare(cfg, info)
    from loretta import engine as E  # deepspeed is imported only now, after every check

    backend = cfg.engine.dist_backend
    if backend == "auto":
        backend = "nccl" if p.device.type == "cuda" else "gloo"
    E.init_distributed(info, backend, cfg.engine.timeout_s)
    rank, world = info.rank, info.world_size
    torch.manual_seed(cfg.run.seed)
    root = ckpt.checkpoints_dir(cfg)
    if p.universal and p.resume_dir is not None:
        if rank == 0 and not (p.resume_dir / "universal").exists():
            tmp = p.resume_dir / ".universal.tmp"
            E.convert_to_universal(p.resume_dir / "ds", tmp)
            os.replace(tmp, p.resume_dir / "universal")
        E.barrier()
    init_state = None
    if p.resume_dir is None and cfg.checkpoint.init_from and rank == 0:
        from loretta.convert import load_for_init

        init_state = load_for_init(cfg.checkpoint.init_from, cfg.model, p.layout)
    eng = E.build_engine(cfg, p.ds_config, cfg.run.seed, init_state)
    del init_state
    eng.module.set_backend(cfg.model.attn_backend, p.device)

    step, tokens_seen, loader_state, wandb_id = 0, 0, None, None
    if p.resume_dir is not None and p.resume_state is not None:
        eng.load(p.resume_dir, universal=p.universal)
        step = int(p.resume_state["step"])
        tokens_seen = int(p.resume_state.get("tokens_seen", 0))
        loader_state = p.resume_state.get("loader_state")
        wandb_id = p.resume_state.get("wandb_id")
    objective = objective or p.objective
    loader, _ = build_loader(cfg, rank, world, loader_state, objective.planner_factory())
    data = iter(loader)

    if dry_run:
        return _dry_run(cfg, eng, data, objective, rank)

    names = direction_names(p.layout)
    stats = LossStats(names, p.layout.names, eng.device)
    peak, peak_src = detect_peak_flops(p.device, cfg.logging.peak_flops)
    flops_tok = cfg.model.flops_per_token(cfg.data.seq_len)
    logger = MetricsLogger(
        cfg.run.path,
        rank == 0,
        cfg.logging.wandb,
        cfg.logging.project,
        cfg.logging.entity,
        cfg.run.name,
        to_dict(cfg),
        wandb_id,
        cfg.logging.progress,
        cfg.run.steps,
        step,
    )
    if rank == 0:
        n_params = sum(getattr(q, "ds_numel", q.numel()) for q in eng.module.parameters())
        logger.event(
            step,
            "start",
            world_size=world,
            params=n_params,
            device=str(p.device),
            backend=eng.module.backend,
            resumed_from=str(p.resume_dir or ""),
            peak_flops=peak,
            peak_source=peak_src,
            flops_per_token=flops_tok,
        )
    signals = signals if signals is not None else SignalFlag()
    watchdog = Watchdog(cfg.engine.timeout_s)
    nan = NanPolicy(cfg.faults.nan_policy, cfg.faults.max_nan_skips)
    if p.resume_state is not None:  # the skip budget spans the whole run, resumes included
        nan.skipped = int(p.resume_state.get("nan_skipped", 0))
    accum, B, T = cfg.optim.grad_accum_steps, cfg.data.micro_batch_size, cfg.data.seq_len
    audit = _Audit(cfg.run.path / "audit" / f"rank{rank:05d}.jsonl") if cfg.data.audit else None
    window = {
        "t0": time.perf_counter(),
        "wait": 0.0,
        "tokens": 0,
        "real": 0,
        "steps": 0,
        "gen_s": 0.0,
        "gen_tokens": 0.0,
    }
    mix_tokens: list[int] = []
    read_errors: dict[int, int] = {}
    code = EXIT_OK

    def save(at_step: int) -> None:
        watchdog.pause(True)
        state = {
            "tokens_seen": tokens_seen,
            "loader_state": loader_state,
            "wandb_id": logger.wandb_id,
            "nan_skipped": nan.skipped,
            "data_read_errors": sum(read_errors.values()),
        }
        ckpt.save_checkpoint(
            root,
            at_step,
            rank,
            world,
            eng.save,
            E.barrier,
            cfg,
            p.layout,
            state,
            cfg.checkpoint.keep_last,
            crash_after_engine=at_step in cfg.faults.crash_in_save_at,
        )
        logger.event(at_step, "checkpoint", path=str(ckpt.step_dir(root, at_step)))
        watchdog.pause(False)

    if p.resume_dir is not None:  # last before step 1: set-up above draws from the RNGs
        ckpt.load_rng(p.resume_dir, rank, world)
    try:
        eng.train()
        while step < cfg.run.steps:
            eng.set_lr(lr := lr_at(step, cfg))
            step_loss = torch.zeros(3, dtype=torch.float64)
            for _ in range(accum):
                t0 = time.perf_counter()
                batch = next(data)
                window["wait"] += time.perf_counter() - t0
                batch = objective.prepare(batch, eng, step)
                window["gen_s"] += objective.last_generation.get("gen_s", 0.0)
                window["gen_tokens"] += objective.last_generation.get("gen_tokens", 0.0)
                tok = batch["tokens"].to(eng.device)
                logits = eng(
                    tok, batch["positions"].to(eng.device), batch["doc_ids"].to(eng.device)
                )
                targets = batch["targets"].to(eng.device)
                tl = cross_entropy_per_token(logits, targets)
                valid = targets.reshape(-1) != IGNORE
                n_valid = valid.sum()
                loss = tl.sum() / n_valid.clamp(min=1)
                if step + 1 in cfg.faults.inject_nan_at:
                    loss = loss * float("nan")
                eng.backward(loss)
                applied, gnorm = eng.step()
                stats.add(
                    tl,
                    valid,
                    batch["target_direction"].to(eng.device).reshape(-1),
                    batch["target_modality"].to(eng.device).reshape(-1),
                )
                step_loss[0] += float(loss.detach())
                step_loss[1] += 1
                window["tokens"] += B * T
                window["real"] += int((batch["tokens"] != p.layout.pad_id).sum())
                loader_state = batch["state"]
                if audit is not None:
                    audit.write(step + 1, batch["docs"])
                mix_tokens = batch["mix_tokens"]
                read_errors[batch["worker"]] = batch["read_errors"]
            # one collective per step: mean loss and whether any rank got a signal
            step_loss[2] = 1.0 if signals.received is not None else 0.0
            agg = E.all_reduce_(step_loss.to(eng.device)).cpu()
            mean_loss = float(agg[0] / agg[1])
            counted = nan.check(step + 1, applied, mean_loss, gnorm)
            if not counted:
                logger.event(
                    step + 1,
                    "skipped_nonfinite",
                    loss=mean_loss,
                    grad_norm=gnorm,
                    skipped_total=nan.skipped,
                )
            tokens_seen += B * T * accum * world
            step += 1
            window["steps"] += 1
            watchdog.beat()
            logger.advance()
            if step % cfg.logging.interval == 0 or step == cfg.run.steps:
                _log(
                    logger,
                    stats,
                    E,
                    step,
                    lr,
                    gnorm,
                    window,
                    world,
                    flops_tok,
                    peak,
                    eng,
                    mix_tokens,
                    cfg,
                    tokens_seen,
                    nan.skipped,
                    sum(read_errors.values()),
                )
            if agg[2] > 0:
                save(step)
                logger.event(step, "preempted", exit_code=EXIT_PREEMPTED)
                code = EXIT_PREEMPTED
                break
            if (
                cfg.checkpoint.interval
                and step % cfg.checkpoint.interval == 0
                and step < cfg.run.steps
            ):
                save(step)
        if code == EXIT_OK and cfg.checkpoint.save_final:
            save(step)
    except StopTraining as e:
        logger.event(step + 1, "stopped", reason=str(e), exit_code=e.code)
        code = e.code
    finally:
        watchdog.stop()
        signals.restore()
        logger.close()
    return code


def _log(
    logger: MetricsLogger,
    stats: LossStats,
    E: Any,
    step: int,
    lr: float,
    gnorm: float,
    window: dict[str, float],
    world: int,
    flops_tok: float,
    peak: float,
    eng: Any,
    mix_tokens: list[int],
    cfg: TrainConfig,
    tokens_seen: int,
    nan_skipped: int,
    read_errors: int,
) -> None:
    losses = stats.reduce_and_reset(E.all_reduce_)
    elapsed = time.perf_counter() - window["t0"]
    tok_s_dev = window["tokens"] / max(elapsed, 1e-9)
    m: dict[str, Any] = dict(losses)
    total_mix = sum(mix_tokens) or 1
    for s, n in zip(cfg.data.sources, mix_tokens):
        m[f"data/mix/{s.name}"] = n / total_mix
    m.update(
        {
            "lr": lr,
            "grad_norm": gnorm,
            "tokens_per_s": tok_s_dev * world,
            "tokens_per_s_per_device": tok_s_dev,
            "mfu": tok_s_dev * flops_tok / peak if peak > 0 else 0.0,
            "data_wait_frac": window["wait"] / max(elapsed, 1e-9),
            "generation_share": window["gen_s"] / max(elapsed, 1e-9),
            "gen_tokens_per_s": window["gen_tokens"] / max(window["gen_s"], 1e-9),
            "packing_efficiency": window["real"] / max(window["tokens"], 1),
            "tokens_seen": tokens_seen,
            "step_time_s": elapsed / max(window["steps"], 1),
            "nan_skipped": nan_skipped,
            "data_read_errors": read_errors,
            "mem_rss_gb": _rss_gb(),
        }
    )
    if eng.device.type == "cuda":
        m["mem_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    logger.log(step, m)
    window.update(
        t0=time.perf_counter(), wait=0.0, tokens=0, real=0, steps=0, gen_s=0.0, gen_tokens=0.0
    )


class _Audit:
    """Appends the documents each step consumed: {"step", "docs": [[source, sample, epoch]]}."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, step: int, docs: Any) -> None:
        import json

        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "docs": docs[:, 1:].tolist()}) + "\n")


def _rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


def _dry_run(cfg: TrainConfig, eng: Any, data: Any, objective: Any, rank: int) -> int:
    t0 = time.perf_counter()
    batch = objective.prepare(next(data), eng, 0)
    eng.train()
    logits = eng(
        batch["tokens"].to(eng.device),
        batch["positions"].to(eng.device),
        batch["doc_ids"].to(eng.device),
    )
    targets = batch["targets"].to(eng.device)
    loss = cross_entropy_per_token(logits, targets).sum() / (targets != IGNORE).sum().clamp(min=1)
    eng.backward(loss)
    if rank == 0:
        mem = torch.cuda.max_memory_allocated() / 2**30 if eng.device.type == "cuda" else _rss_gb()
        print(
            f"[loretta] dry run OK: config, data and one full batch "
            f"({cfg.data.micro_batch_size}x{cfg.data.seq_len}) forward+backward; "
            f"loss {float(loss):.4f}, {time.perf_counter() - t0:.2f}s, memory {mem:.2f} GB",
            flush=True,
        )
    return EXIT_OK
