"""Callbacks: features that run after each optimizer step without an `if` in the loop.

    class LinkingMonitor:
        def on_step_end(self, step: int, ctx: StepContext) -> dict[str, float] | None:
            if step % 100:
                return None
            return {"val/linking": score(ctx.engine.module)}

`run(cfg, info, callbacks=[LinkingMonitor()])` calls every callback on every rank after every
optimizer step (so a callback may run collectives, and must reduce its own numbers across
ranks); metrics it returns are logged (by rank 0) with that step's metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from loretta.config import TrainConfig
from loretta.vocab import VocabLayout


@dataclass(frozen=True)
class StepContext:
    """What a callback may look at: the engine (engine.module is the model), the run's config
    and vocabulary layout, this process's rank and the world size."""

    engine: Any
    cfg: TrainConfig
    layout: VocabLayout
    rank: int
    world: int


class Callback(Protocol):
    def on_step_end(self, step: int, ctx: StepContext) -> dict[str, float] | None: ...


def step_end(callbacks: Sequence[Callback], step: int, ctx: StepContext) -> dict[str, float]:
    """Run every callback for the step that just finished; their metrics, merged in order."""
    out: dict[str, float] = {}
    for cb in callbacks:
        out.update(cb.on_step_end(step, ctx) or {})
    return out
