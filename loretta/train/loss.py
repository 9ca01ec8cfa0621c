"""The training loss, behind one function: per-token cross entropy in fp32.

The step divides the summed per-token losses by the micro-batch's count of loss tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loretta.data.sequences import IGNORE


def cross_entropy_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B*T,) losses in fp32 (0 where target is IGNORE)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
