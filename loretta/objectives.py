"""Training objectives: how documents are planned and completed before the forward pass.

The plain objective trains on real modalities only (commutative or fixed order comes from
data.sequence.order). The transitive objective (LoReTTa) is added in loretta/transitive.py.
"""

from __future__ import annotations

from typing import Any

from loretta.config import TrainConfig
from loretta.vocab import VocabLayout


class Objective:
    """Plain causal / commutative modelling: nothing to generate."""

    def planner_factory(self) -> Any:
        return None  # the loader's default document planner

    def prepare(self, batch: dict[str, Any], engine: Any, step: int) -> dict[str, Any]:
        return batch


def build_objective(cfg: TrainConfig, layout: VocabLayout) -> Objective:
    return Objective()
