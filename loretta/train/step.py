"""One optimizer step: data -> objective.prepare -> forward -> loss -> backward -> step, once per
micro-batch (DeepSpeed accumulates and applies the update at the last one).

    result = train_step(step, eng, data, objective, cfg, stats, pad_id, stop_requested)

The step's one collective all-reduces the mean loss together with whether any rank was asked to
stop (a preemption signal), so that every rank leaves the loop at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from loretta.comm import all_reduce_, world_size
from loretta.config import TrainConfig
from loretta.data.sequences import IGNORE
from loretta.train.faults import EXIT_OK
from loretta.train.metrics import LossStats, rss_gb


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


@dataclass
class MicroBatch:
    """The loader's bookkeeping of one micro-batch (for resume, mixing, audit, errors)."""

    state: Any  # the loader state after this micro-batch
    docs: Any  # (rows' documents, [row, source, sample, epoch]) for the audit log
    mix_tokens: list[int]  # tokens per source in this micro-batch's rows
    worker: int
    read_errors: int
    doc_blocks: Any = None  # per document: its blocks [(modality, n, gen_from)], for the audit
    overflow_dropped: int = 0  # documents dropped by packing in chunks reported with this batch


@dataclass
class StepResult:
    lr: float
    loss: float  # mean over micro-batches and ranks
    applied: bool  # False: DeepSpeed skipped a non-finite update
    grad_norm: float
    stop_requested: bool  # some rank got a preemption signal
    data_wait_s: float = 0.0
    gen_s: float = 0.0
    gen_tokens: float = 0.0
    tokens: int = 0  # row slots processed on this rank (padding included)
    real_tokens: int = 0  # of which not padding
    micro: list[MicroBatch] = field(default_factory=list)


def forward_loss(eng: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (per-token losses (B*T,) fp32, valid mask (B*T,)) of one micro-batch. The loss is
    fused with the output projection inside the model (loretta/train/loss.py): no B x T x V
    fp32 logits."""
    targets = batch["targets"].to(eng.device)
    tok_loss = eng(
        batch["tokens"].to(eng.device),
        batch["positions"].to(eng.device),
        batch["doc_ids"].to(eng.device),
        targets=targets,
    )
    return tok_loss, targets.reshape(-1) != IGNORE


def train_step(
    step: int,
    eng: Any,
    data: Iterator[dict[str, Any]],
    objective: Any,
    cfg: TrainConfig,
    stats: LossStats,
    pad_id: int,
    stop_requested: Callable[[], bool],
) -> StepResult:
    """Step `step` (0-based: the step that becomes `step + 1` once applied)."""
    eng.set_lr(lr := lr_at(step, cfg))
    r = StepResult(lr, 0.0, False, float("nan"), False)
    # The step's loss is the mean over every loss token of the global batch, wherever it
    # falls: each micro-batch's summed loss is scaled by world * accum / (global count of loss
    # tokens), which cancels DeepSpeed's averaging over ranks and its 1/accum scaling. The
    # micro-batches of the step are fetched and prepared (pseudo-modalities generated: no
    # update happens between them) before the first backward, so the count is known up front:
    # one all-reduce of one number per step. (Dividing each micro-batch by its own count
    # would weigh a token by how many others share its micro-batch, and make (2 ranks x 1)
    # and (1 rank x 2 micro-batches) differ.)
    accum = cfg.optim.grad_accum_steps
    B, T = cfg.data.micro_batch_size, cfg.data.seq_len
    batches = []
    for _ in range(accum):
        t0 = time.perf_counter()
        batch = next(data)
        r.data_wait_s += time.perf_counter() - t0
        batch = objective.prepare(batch, eng, step)
        r.gen_s += objective.last_generation.get("gen_s", 0.0)
        r.gen_tokens += objective.last_generation.get("gen_tokens", 0.0)
        batches.append(batch)
    # loss-token count, then (after the micro-steps) loss sum and stop requested; on the
    # device: no host sync a micro-step
    count = torch.zeros(1, dtype=torch.float64, device=eng.device)
    for batch in batches:
        count += (batch["targets"] != IGNORE).sum().to(eng.device, torch.float64)
    n_global = all_reduce_(count).clamp(min=1)
    scale = (world_size() * accum / n_global).float().squeeze(0)
    step_loss = torch.zeros(2, dtype=torch.float64, device=eng.device)
    for batch in batches:
        tok_loss, valid = forward_loss(eng, batch)
        loss = tok_loss.sum() * scale
        if step + 1 in cfg.faults.inject_nan_at:  # fault injection for tests
            loss = loss * float("nan")
        eng.backward(loss)
        r.applied, r.grad_norm = eng.step()
        stats.add(
            tok_loss,
            valid,
            batch["target_direction"].to(eng.device).reshape(-1),
            batch["target_modality"].to(eng.device).reshape(-1),
        )
        step_loss[0] += tok_loss.detach().sum().double()
        if step + 1 in cfg.faults.inject_nan_at:
            step_loss[0] += float("nan")
        r.tokens += B * T
        r.real_tokens += int((batch["tokens"] != pad_id).sum())
        r.micro.append(
            MicroBatch(
                batch["state"],
                batch["docs"],
                batch["mix_tokens"],
                batch["worker"],
                batch["read_errors"],
                batch.get("doc_blocks"),
                int(batch.get("overflow_dropped", 0)),
            )
        )
    # one collective per step: the global mean loss and whether any rank got a signal
    step_loss[1] = 1.0 if stop_requested() else 0.0
    agg = all_reduce_(step_loss).cpu()
    r.loss = float(agg[0] / n_global.cpu()[0])
    r.stop_requested = bool(agg[1] > 0)
    return r


def dry_run_step(
    cfg: TrainConfig, eng: Any, data: Iterator[dict[str, Any]], objective: Any, rank: int
) -> int:
    """One full-size batch forward+backward (no update): catches out-of-memory early."""
    t0 = time.perf_counter()
    batch = objective.prepare(next(data), eng, 0)
    eng.train()
    tok_loss, valid = forward_loss(eng, batch)
    loss = tok_loss.sum() / valid.sum().clamp(min=1)
    eng.backward(loss)
    if rank == 0:
        mem = torch.cuda.max_memory_allocated() / 2**30 if eng.device.type == "cuda" else rss_gb()
        print(
            f"[loretta] dry run OK: config, data and one full batch "
            f"({cfg.data.micro_batch_size}x{cfg.data.seq_len}) forward+backward; "
            f"loss {float(loss):.4f}, {time.perf_counter() - t0:.2f}s, memory {mem:.2f} GB",
            flush=True,
        )
    return EXIT_OK
