"""Epoch orders per source and token-weighted mixing across sources.

A source's epoch order is a pure function of (seed, source, epoch): shards in a seeded
permutation, and the samples of each shard in a seeded permutation (reads stay shard-local).
The mixer picks, for every next document, the source whose share of *tokens* so far is furthest
below its weight (a deterministic deficit rule), so realised token fractions track the weights
within one document's length, whatever the sources' sample lengths. A source that runs out
starts its next epoch (upsampling small sources).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SourceCursor:
    """Position in a source's endless stream of epochs."""

    def __init__(self, shard_counts: list[int], seed: int, source: int) -> None:
        self.counts = np.asarray(shard_counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.n = int(self.counts.sum())
        self.seed, self.source = seed, source
        self.epoch, self.pos = 0, 0
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._shard_cache: tuple[int, int, np.ndarray] | None = None

    def _epoch_order(self) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.source, self.epoch, 0])
            shards = rng.permutation(len(self.counts))
            bounds = np.cumsum(self.counts[shards])
            self._epoch_cache = (self.epoch, shards, bounds)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _shard_perm(self, shard: int) -> np.ndarray:
        c = self._shard_cache
        if c is None or c[0] != self.epoch or c[1] != shard:
            rng = np.random.default_rng([self.seed, self.source, self.epoch, 1 + shard])
            c = self._shard_cache = (self.epoch, shard, rng.permutation(int(self.counts[shard])))
        return c[2]

    def peek(self) -> tuple[int, int]:
        """(epoch, sample index) of the next sample, without advancing."""
        shards, bounds = self._epoch_order()
        k = int(np.searchsorted(bounds, self.pos, side="right"))
        shard = int(shards[k])
        within = self.pos - (int(bounds[k - 1]) if k else 0)
        return self.epoch, int(self.starts[shard] + self._shard_perm(shard)[within])

    def advance(self) -> None:
        self.pos += 1
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> list[int]:
        return [self.epoch, self.pos]

    def load_state_dict(self, s: list[int]) -> None:
        self.epoch, self.pos = int(s[0]), int(s[1])


class TokenMixer:
    """Deterministic token-weighted choice of the next source."""

    def __init__(self, weights: list[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.tokens = np.zeros(len(w), dtype=np.int64)  # tokens taken per source
        self.docs = np.zeros(len(w), dtype=np.int64)

    def choose(self) -> int:
        # the source furthest below its share: smallest tokens_so_far / weight (ties: lowest index)
        return int(np.argmin(self.tokens / self.weights))

    def record(self, source: int, tokens: int) -> None:
        self.tokens[source] += tokens
        self.docs[source] += 1

    def realised(self) -> list[float]:
        total = self.tokens.sum()
        return (self.tokens / total).tolist() if total else [0.0] * len(self.tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens.tolist(), "docs": self.docs.tolist()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.tokens = np.asarray(s["tokens"], dtype=np.int64)
        self.docs = np.asarray(s["docs"], dtype=np.int64)
