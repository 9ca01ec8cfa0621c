"""Run under torchrun by test_trainer.py: training with a callback that records its calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from loretta.comm import all_reduce_
from loretta.config import load_config
from loretta.dist import discover
from loretta.train.callbacks import StepContext
from loretta.train.trainer import run


class Probe:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def on_step_end(self, step: int, ctx: StepContext) -> dict[str, float] | None:
        ranks = all_reduce_(torch.ones(1))  # a collective: every rank runs every callback
        self.calls.append({"step": step, "rank": ctx.rank, "world": ctx.world})
        if step % 2:
            return None
        return {"cb/step": float(step), "cb/ranks": float(ranks.item())}


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    info = discover()
    probe = Probe()
    code = run(load_config("tiny", overrides), info, callbacks=[probe])
    (out / f"calls{info.rank}.json").write_text(json.dumps(probe.calls))
    sys.exit(code)


if __name__ == "__main__":
    main()
