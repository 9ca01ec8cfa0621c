"""Saving during training: when to save, and the collective save of one step's folder.

The folder format (atomic rename, `latest` written last) is loretta/train/checkpoint.py's; this
part adds what the loop knows: the engine, the watchdog (paused while saving) and the log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loretta.config import TrainConfig
from loretta.train import checkpoint as ckpt
from loretta.train.faults import Watchdog
from loretta.train.metrics import MetricsLogger
from loretta.vocab import VocabLayout


class Checkpointer:
    def __init__(
        self,
        cfg: TrainConfig,
        layout: VocabLayout,
        rank: int,
        world: int,
        save_engine: Callable[..., None],
        barrier: Callable[[], None],
        watchdog: Watchdog,
        logger: MetricsLogger,
    ) -> None:
        self.cfg, self.layout, self.rank, self.world = cfg, layout, rank, world
        self.save_engine, self.barrier = save_engine, barrier
        self.watchdog, self.logger = watchdog, logger
        self.root = ckpt.checkpoints_dir(cfg)

    def due(self, step: int) -> bool:
        """An interval checkpoint (the final one is saved after the loop, if configured)."""
        every = self.cfg.checkpoint.interval
        return bool(every) and step % every == 0 and step < self.cfg.run.steps

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Collective: every rank calls it. `state` goes into state.json (resume needs it)."""
        self.watchdog.pause(True)  # a long save is no hung step
        ckpt.save_checkpoint(
            self.root,
            step,
            self.rank,
            self.world,
            self.save_engine,
            self.barrier,
            self.cfg,
            self.layout,
            state,
            self.cfg.checkpoint.keep_last,
            crash_after_engine=step in self.cfg.faults.crash_in_save_at,
        )
        self.logger.event(step, "checkpoint", path=str(ckpt.step_dir(self.root, step)))
        self.watchdog.pause(False)
