"""The trainer: set-up, then the loop that calls the parts, read top-down.

run(cfg, info, callbacks=[...]) -> exit code

prepare        check config, data, resume checkpoint, DeepSpeed JSON (no process group yet)
start_engine   process group, ZeRO-3 engine (warm start or universal conversion if needed)
resume         engine, RNG and progress from the checkpoint
the loop       train_step (step.py) -> NaN policy (faults.py) -> callbacks (callbacks.py)
               -> metrics window (metrics.py) -> preemption / interval saves
               (checkpointing.py)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loretta.config import TrainConfig, available_memory, memory_problems
from loretta.configlib import to_dict
from loretta.data.loader import build_loader, open_sources
from loretta.data.sequences import direction_names
from loretta.dist import DistInfo
from loretta.dsconfig import nvme_problems, resolve_ds_config, uses_nvme
from loretta.errors import CheckpointError, ConfigError
from loretta.model.decoder import compile_enabled
from loretta.objectives import Objective
from loretta.train import checkpoint as ckpt
from loretta.train import runlock
from loretta.train.callbacks import Callback, StepContext, step_end
from loretta.train.checkpointing import Checkpointer
from loretta.train.faults import (
    EXIT_OK,
    EXIT_PREEMPTED,
    NanPolicy,
    SignalFlag,
    StopTraining,
    Watchdog,
)
from loretta.train.metrics import (
    LossStats,
    MetricsLogger,
    Window,
    detect_peak_flops,
    host_info,
    window_metrics,
)
from loretta.train.step import MicroBatch, dry_run_step, train_step
from loretta.transitive import build as build_objective
from loretta.transitive import (
    closed_gates,
    count_passes,
    gated_links,
    open_gates,
    passed_gates,
)
from loretta.vocab import VocabLayout

# ---- set-up: everything a user can get wrong, before any process group ----------------------


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
    layout: VocabLayout
    ds_config: dict[str, Any]
    resume_dir: Path | None
    resume_state: dict[str, Any] | None
    universal: bool  # resuming at another world size: through a universal checkpoint
    objective: Objective


def check_memory(cfg: TrainConfig, device: torch.device, info: DistInfo) -> None:
    avail, source = available_memory(device.type, info.local_world_size)
    problems = memory_problems(cfg, info.world_size, avail, source)
    if problems:
        raise ConfigError(problems)


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
        from loretta.checkpoint.load import check_init_source

        check_init_source(
            cfg.checkpoint.init_from, cfg.model, layout, cfg.checkpoint.init_layout
        ).close()  # headers only
    universal = bool(state and state.get("world_size") != info.world_size)
    compiled = compile_enabled(cfg.model.compile, device.type)
    ds_config = resolve_ds_config(cfg, info.world_size, load_universal=universal, compiled=compiled)
    if problems := nvme_problems(ds_config, cfg.engine.deepspeed_config):
        raise ConfigError(problems, "engine.deepspeed_config")
    objective = build_objective(cfg, layout)  # link graph checked against the layout
    if uses_nvme(ds_config):  # the one check that needs deepspeed (imported only here)
        from loretta.engine import check_async_io

        check_async_io()
    return Prepared(cfg, info, device, layout, ds_config, resume_dir, state, universal, objective)


def start_engine(p: Prepared) -> tuple[Any, Any]:
    """-> (the engine module, the engine): process group, then the ZeRO-3 engine."""
    from loretta import engine as E  # deepspeed is imported only now, after every check

    cfg, info = p.cfg, p.info
    backend = cfg.engine.dist_backend
    if backend == "auto":
        backend = "nccl" if p.device.type == "cuda" else "gloo"
    E.init_distributed(info, backend, cfg.engine.timeout_s)
    torch.manual_seed(cfg.run.seed)
    if p.universal and p.resume_dir is not None:
        if info.rank == 0 and not (p.resume_dir / "universal").exists():
            tmp = p.resume_dir / ".universal.tmp"
            E.convert_to_universal(p.resume_dir / "ds", tmp)
            os.replace(tmp, p.resume_dir / "universal")
        E.barrier()
    init_state = None
    if p.resume_dir is None and cfg.checkpoint.init_from and info.rank == 0:
        from loretta.checkpoint.load import load_for_init

        init_state = load_for_init(
            cfg.checkpoint.init_from, cfg.model, p.layout, cfg.checkpoint.init_layout
        )
    eng = E.build_engine(cfg, p.ds_config, cfg.run.seed, init_state)
    del init_state
    eng.module.set_backend(cfg.model.attn_backend, p.device)
    return E, eng


@dataclass
class Progress:
    """What a checkpoint must carry beside the engine to continue the run exactly."""

    step: int = 0
    tokens_seen: int = 0
    loader_state: Any = None
    wandb_id: str | None = None
    nan_skipped: int = 0
    mix_tokens: list[int] = field(default_factory=list)  # per source, this job's micro-batches
    read_errors: dict[int, int] = field(default_factory=dict)  # by loader worker
    overflow_dropped: int = 0  # packing drops in the chunks this rank reported (this job)
    # gated links: monitor checks in a row that reached the gate, by link index (transitive.py)
    gate_passes: dict[str, int] = field(default_factory=dict)

    def consumed(self, micro: MicroBatch, audit: Audit | None, step: int) -> None:
        self.loader_state = micro.state
        if audit is not None:
            audit.write(step, micro.docs, micro.doc_blocks)
        if len(self.mix_tokens) != len(micro.mix_tokens):
            self.mix_tokens = [0] * len(micro.mix_tokens)
        self.mix_tokens = [a + b for a, b in zip(self.mix_tokens, micro.mix_tokens)]
        self.overflow_dropped += micro.overflow_dropped
        self.read_errors[micro.worker] = micro.read_errors

    def checkpoint_state(self, wandb_id: str, nan_skipped: int) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "loader_state": self.loader_state,
            "wandb_id": wandb_id,
            "nan_skipped": nan_skipped,
            "data_read_errors": sum(self.read_errors.values()),
            "gate_passes": dict(self.gate_passes),
        }


def resume(p: Prepared, eng: Any) -> Progress:
    """Load the engine, this rank's RNG and the progress counters, if resuming."""
    if p.resume_dir is None or p.resume_state is None:
        return Progress()
    eng.load(p.resume_dir, universal=p.universal)  # the RNG is restored last (see run)
    s = p.resume_state
    return Progress(
        step=int(s["step"]),
        tokens_seen=int(s.get("tokens_seen", 0)),
        loader_state=s.get("loader_state"),
        # a checkpoint of another run (a branch) starts its own wandb run
        wandb_id=s.get("wandb_id") if _own_checkpoint(p) else None,
        nan_skipped=int(s.get("nan_skipped", 0)),  # the skip budget spans resumes
        gate_passes=_gate_passes(s.get("gate_passes"), p.resume_dir),
    )


def _gate_passes(raw: Any, folder: Path) -> dict[str, int]:
    """A checkpoint's counts of gate checks passed (carried like the loader state's gate rows; a
    checkpoint without gated links, or from before gate_checks, has none)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw.values()
    ):
        raise CheckpointError(
            f"{folder}/state.json: gate_passes={raw!r} must map link indices to counts >= 0; "
            "the checkpoint is corrupt or not one of ours: resume from another checkpoint"
        )
    return {str(k): v for k, v in raw.items()}


def _own_checkpoint(p: Prepared) -> bool:
    assert p.resume_dir is not None
    return p.resume_dir.resolve().parent == ckpt.checkpoints_dir(p.cfg).resolve()


class Audit:
    """Appends the documents each step consumed: {"step", "docs": [[source, sample, epoch]],
    "blocks": [[[modality, n, gen_from], ...]]} (gen_from >= 0: a generated block)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, step: int, docs: Any, blocks: Any = None) -> None:
        line: dict[str, Any] = {"step": step, "docs": docs[:, 1:].tolist()}
        if blocks is not None:
            line["blocks"] = blocks
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


# ---- the run -----------------------------------------------------------------------------


def run(
    cfg: TrainConfig,
    info: DistInfo,
    dry_run: bool = False,
    objective: Any = None,
    signals: SignalFlag | None = None,
    callbacks: Sequence[Callback] = (),
) -> int:
    _lock = runlock.hold_run_dir(cfg.run.path, info.rank)  # one job per run folder (rank 0)
    runlock.start_orphan_guard(info.launcher)  # no worker outlives its launcher
    p = prepare(cfg, info)
    from loretta.train.monitor import build_monitors

    callbacks = [*callbacks, *build_monitors(cfg, p.layout)]  # before the process group
    E, eng = start_engine(p)
    rank, world = info.rank, info.world_size
    prog = resume(p, eng)
    objective = objective or p.objective

    def stream(state: Any) -> Any:  # this rank's batches from a loader state (None: the start)
        return iter(build_loader(cfg, rank, world, state, objective.planner_factory())[0])

    data = stream(prog.loader_state)
    gates = gated_links(objective)  # links whose transitive documents wait for the monitor
    if dry_run:
        return dry_run_step(cfg, eng, data, objective, rank)

    stats = LossStats(direction_names(p.layout), p.layout.names, eng.device)
    peak, peak_src = detect_peak_flops(p.device, cfg.logging.peak_flops, cfg.run.precision)
    flops_tok = cfg.model.flops_per_token(cfg.data.seq_len)
    logger = MetricsLogger(
        cfg.run.path,
        rank == 0,
        cfg.logging.wandb,
        cfg.logging.project,
        cfg.logging.entity,
        cfg.run.name,
        to_dict(cfg),
        prog.wandb_id,
        cfg.logging.progress,
        cfg.run.steps,
        prog.step,
    )
    if rank == 0:
        n_params = sum(getattr(q, "ds_numel", q.numel()) for q in eng.module.parameters())
        logger.event(
            prog.step,
            "start",
            world_size=world,
            params=n_params,
            device=str(p.device),
            backend=eng.module.backend,
            resumed_from=str(p.resume_dir or ""),
            peak_flops=peak,
            peak_source=peak_src,
            flops_per_token=flops_tok,
            host=host_info(p.device),
        )
    flag = signals if signals is not None else SignalFlag()
    watchdog = Watchdog(cfg.engine.timeout_s)
    nan = NanPolicy(cfg.faults.nan_policy, cfg.faults.max_nan_skips)
    nan.skipped = prog.nan_skipped
    saver = Checkpointer(cfg, p.layout, rank, world, eng.save, E.barrier, watchdog, logger)
    ctx = StepContext(eng, cfg, p.layout, rank, world)
    audit = Audit(cfg.run.path / "audit" / f"rank{rank:05d}.jsonl") if cfg.data.audit else None
    window = Window()
    code = EXIT_OK

    def save(step: int) -> None:
        saver.save(step, prog.checkpoint_state(logger.wandb_id, nan.skipped))

    if p.resume_dir is not None:  # last before step 1: the set-up above draws from the RNGs
        ckpt.load_rng(p.resume_dir, rank, world)
    try:
        eng.train()
        while prog.step < cfg.run.steps:
            r = train_step(
                prog.step,
                eng,
                data,
                objective,
                cfg,
                stats,
                p.layout.pad_id,
                lambda: flag.received is not None,
            )
            for mb in r.micro:
                prog.consumed(mb, audit, prog.step + 1)
            if not nan.check(prog.step + 1, r.applied, r.loss, r.grad_norm):
                logger.event(
                    prog.step + 1,
                    "skipped_nonfinite",
                    loss=r.loss,
                    grad_norm=r.grad_norm,
                    skipped_total=nan.skipped,
                )
            prog.tokens_seen += r.tokens * world
            prog.step += 1
            step = prog.step
            window.add(r.data_wait_s, r.gen_s, r.gen_tokens, r.tokens, r.real_tokens)
            watchdog.beat()
            logger.advance()
            extra = step_end(callbacks, step, ctx)
            closed = closed_gates(gates, prog.loader_state) if gates else []
            if closed and step % cfg.monitor.interval == 0:  # a monitor step: its scores are in
                passed = passed_gates(closed, extra, eng.device)
                prog.gate_passes, opened = count_passes(closed, passed, prog.gate_passes)
                if opened:
                    prog.loader_state = open_gates(prog.loader_state, opened)
                    del data  # its workers planned rows ahead with the gates closed
                    data = stream(prog.loader_state)
                    rows = prog.loader_state["planner"]["gate_rows"]
                    for lk in opened if rank == 0 else ():
                        logger.event(
                            step,
                            "transitive_gate",
                            link=lk.index,
                            metric=lk.gate_metric,
                            score=extra.get(lk.gate_metric),
                            gate=lk.gate,
                            checks=lk.gate_checks,
                            start_row=rows[str(lk.index)],
                        )
            if step % cfg.logging.interval == 0 or step == cfg.run.steps:
                m = window_metrics(
                    stats.reduce_and_reset(E.all_reduce_),
                    window,
                    sources=[s.name for s in cfg.data.sources],
                    mix_tokens=prog.mix_tokens,
                    lr=r.lr,
                    grad_norm=r.grad_norm,
                    world=world,
                    flops_per_token=flops_tok,
                    peak_flops=peak,
                    tokens_seen=prog.tokens_seen,
                    nan_skipped=nan.skipped,
                    read_errors=sum(prog.read_errors.values()),
                    overflow_dropped=prog.overflow_dropped,
                    device=eng.device,
                )
                logger.log(step, {**m, **extra})
                window.reset()
            elif extra:
                logger.log(step, extra)
            if r.stop_requested:  # preemption: save, then exit for the scheduler to requeue
                save(step)
                logger.event(step, "preempted", exit_code=EXIT_PREEMPTED)
                code = EXIT_PREEMPTED
                break
            if saver.due(step):
                save(step)
        if code == EXIT_OK and cfg.checkpoint.save_final:
            save(prog.step)
    except StopTraining as e:
        logger.event(prog.step + 1, "stopped", reason=str(e), exit_code=e.code)
        code = e.code
    finally:
        watchdog.stop()
        flag.restore()
        logger.close()
    return code
