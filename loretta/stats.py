"""Statistics for reported results: per-seed summaries and paired bootstrap intervals.

The rules (shared/reference EVIDENCE.md): the spread over seeds is the *sample* standard
deviation (n - 1), and a single seed has none; a comparison of two methods is paired (same
seeds, same items) and its 95% interval comes from a bootstrap over seeds x items, resampling
seeds and then items within each seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation); the deviation is None for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_std of no values")
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else None)


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """'0.215 ± 0.044' (n > 1 seeds) or '0.215 (1 seed)': never a '± 0.000' for one seed."""
    m, s = mean_std(values)
    if s is None:
        return f"{m:.{digits}f} (1 seed)"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def chance_band(n_items: int, n_classes: int = 10) -> tuple[float, float]:
    """Chance accuracy ± 2 binomial standard errors for n items: 0.10 ± 2·sqrt(0.09/n)."""
    p = 1.0 / n_classes
    half = 2.0 * math.sqrt(p * (1 - p) / max(n_items, 1))
    return p - half, p + half


def paired_bootstrap(
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of a - b and its bootstrap interval, for per-seed arrays of per-item scores.

    a[s] and b[s] hold the same items (in the same order) of seed s for the two methods. Each
    replicate draws seeds with replacement, then items with replacement within each drawn seed,
    and averages the paired differences. Returns (observed mean difference, low, high)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same seeds for both methods (got {len(a)} and {len(b)})")
    diffs = []
    for s, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"seed {s}: {x.shape} items vs {y.shape}: must be paired")
        diffs.append(x - y)
    observed = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    n_seeds = len(diffs)
    reps = np.empty(n_boot)
    for r in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds)
        reps[r] = np.mean(
            [diffs[s][rng.integers(0, len(diffs[s]), len(diffs[s]))].mean() for s in seeds]
        )
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return observed, float(lo), float(hi)
