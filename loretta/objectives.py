"""Training objectives: how documents are planned and completed before the forward pass.

The plain objective trains on real modalities only: causal one-direction modelling with
data.sequence.order=fixed, commutative modelling with order=random. LoReTTa adds transitive
documents when objective.links is set (loretta/transitive.py, which builds the objective of a
config: `loretta.transitive.build`). This module imports nothing of it, so that the transitive
objective can build on `Objective` without an import cycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Objective:
    """Plain causal / commutative modelling: nothing to generate."""

    last_generation: dict[str, float] = {}  # noqa: RUF012 - read-only default

    def planner_factory(self) -> Any:
        return None  # the loader's default document planner

    def prepare(self, batch: dict[str, Any], engine: Any, step: int) -> dict[str, Any]:
        return batch


class LocalEngine:
    """The engine interface the objectives need, for a plain module (evaluation, tests)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    @property
    def device(self) -> Any:
        return next(self.module.parameters()).device

    @contextlib.contextmanager
    def generation(self, mode: str = "once", layers_per_group: int = 4) -> Iterator[Any]:
        yield self.module
