"""Epoch orders per source, random access into a source's endless stream, and the deficit rule.

A source's epoch order is a pure function of (seed, source, epoch): shards in a seeded
permutation, and the samples of each shard in a seeded permutation (reads stay shard-local).
A source's *stream index* k (0, 1, 2, ...) is sample `k % n` of that order in epoch `k // n`:
`SourceCursor.at(k)` finds it in O(log shards) without walking the stream, so a chunk of the
global stream can be planned from its position alone (loretta/data/chunks.py).

`SourceOrder` adds a per-sample measure (planned tokens, or 1 per usable sample) and finds, in
O(log), the first stream index whose running measure reaches a given value: that is how a chunk
takes "the next Q tokens" of a source without knowing what the earlier chunks took.

`TokenMixer` is the deficit rule (the source furthest below its share next); the reference
tools use it for realised shares.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np


class Lru(OrderedDict):  # type: ignore[type-arg]
    """A small least-recently-used cache (epoch orders, shard permutations, planned chunks)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value

    def hit(self, key: Any) -> Any:
        v = self.get(key)
        if v is not None:
            self.move_to_end(key)
        return v


class SourceCursor:
    """Position in a source's endless stream of epochs (sequential walk or random access)."""

    def __init__(self, shard_counts: list[int], seed: int, source: int) -> None:
        self.counts = np.asarray(shard_counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.n = int(self.counts.sum())
        self.seed, self.source = seed, source
        self.epoch, self.pos = 0, 0
        self._epochs = Lru(4)  # epoch -> (shard order, cumulative sample counts in that order)
        self._perms = Lru(16)  # (epoch, shard) -> permutation of the shard's samples

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._epochs.hit(epoch)
        if hit is None:
            rng = np.random.default_rng([self.seed, self.source, epoch, 0])
            shards = rng.permutation(len(self.counts))
            hit = self._epochs.put(epoch, (shards, np.cumsum(self.counts[shards])))
        return hit  # type: ignore[no-any-return]

    def shard_perm(self, epoch: int, shard: int) -> np.ndarray:
        hit = self._perms.hit((epoch, shard))
        if hit is None:
            rng = np.random.default_rng([self.seed, self.source, epoch, 1 + shard])
            hit = self._perms.put((epoch, shard), rng.permutation(int(self.counts[shard])))
        return hit  # type: ignore[no-any-return]

    def locate(self, epoch: int, pos: int) -> tuple[int, int, int]:
        """(place of the shard in the epoch's order, shard, position within the shard)."""
        shards, bounds = self.epoch_order(epoch)
        j = int(np.searchsorted(bounds, pos, side="right"))
        return j, int(shards[j]), pos - (int(bounds[j - 1]) if j else 0)

    def at(self, k: int) -> tuple[int, int]:
        """(epoch, sample index) at stream index k: O(log shards), no walk."""
        epoch, pos = divmod(k, self.n)
        _, shard, within = self.locate(epoch, pos)
        return epoch, int(self.starts[shard] + self.shard_perm(epoch, shard)[within])

    def span(self, k0: int, k1: int) -> list[tuple[int, int]]:
        """[at(k) for k in range(k0, k1)], vectorised over each shard the span touches."""
        out: list[tuple[int, int]] = []
        k = k0
        while k < k1:
            epoch, pos = divmod(k, self.n)
            end = min(k1 - epoch * self.n, self.n)  # this epoch's part of the span
            shards, bounds = self.epoch_order(epoch)
            j = int(np.searchsorted(bounds, pos, side="right"))
            while pos < end:
                shard = int(shards[j])
                lo = int(bounds[j - 1]) if j else 0
                stop = min(end, int(bounds[j]))
                perm = self.shard_perm(epoch, shard)
                idx = self.starts[shard] + perm[pos - lo : stop - lo]
                out += [(epoch, i) for i in idx.tolist()]
                pos, j = stop, j + 1
            k = epoch * self.n + end
        return out

    def peek(self) -> tuple[int, int]:
        """(epoch, sample index) of the next sample, without advancing."""
        return self.at(self.epoch * self.n + self.pos)

    def advance(self) -> None:
        self.pos += 1
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0

    def seek(self, k: int) -> None:
        self.epoch, self.pos = divmod(k, self.n)

    def state_dict(self) -> list[int]:
        return [self.epoch, self.pos]

    def load_state_dict(self, s: list[int]) -> None:
        self.epoch, self.pos = int(s[0]), int(s[1])


class SourceOrder:
    """A source's stream with a non-negative integer measure per sample (tokens, or 1).

    `first_at(t)`: the smallest stream index k whose running measure (the sum over stream
    indices before k) is >= t. Chunk c of the global stream takes stream indices
    [first_at(ceil(c*Q)), first_at(ceil((c+1)*Q))) for the source's budget Q per chunk."""

    def __init__(self, cursor: SourceCursor, measure: np.ndarray) -> None:
        self.cursor, self.n = cursor, cursor.n
        self.measure = np.asarray(measure)  # small non-negative ints (int32 is enough)
        cs = np.concatenate([[0], np.cumsum(self.measure, dtype=np.int64)])
        starts, counts = cursor.starts, cursor.counts
        self.shard_total = cs[starts + counts] - cs[starts]
        self.total = int(cs[-1])
        self._epochs = Lru(4)  # epoch -> running measure at the end of each shard, in order
        self._locals = Lru(16)  # (epoch, shard) -> running measure within the shard

    def _epoch_ends(self, epoch: int) -> np.ndarray:
        hit = self._epochs.hit(epoch)
        if hit is None:
            shards, _ = self.cursor.epoch_order(epoch)
            hit = self._epochs.put(epoch, np.cumsum(self.shard_total[shards]))
        return hit  # type: ignore[no-any-return]

    def _local_ends(self, epoch: int, shard: int) -> np.ndarray:
        hit = self._locals.hit((epoch, shard))
        if hit is None:
            perm = self.cursor.shard_perm(epoch, shard)
            start = int(self.cursor.starts[shard])
            hit = self._locals.put(
                (epoch, shard), np.cumsum(self.measure[start + perm], dtype=np.int64)
            )
        return hit  # type: ignore[no-any-return]

    def first_at(self, t: int) -> int:
        if t <= 0:
            return 0
        if self.total <= 0:
            raise ValueError("a source with no measure has no position")
        # the sample that covers unit t-1 of the running measure; the answer is the next one
        epoch, x = divmod(t - 1, self.total)
        ends = self._epoch_ends(epoch)
        j = int(np.searchsorted(ends, x, side="right"))
        shards, bounds = self.cursor.epoch_order(epoch)
        shard = int(shards[j])
        local = self._local_ends(epoch, shard)
        q = int(np.searchsorted(local, x - (int(ends[j - 1]) if j else 0), side="right"))
        return epoch * self.n + (int(bounds[j - 1]) if j else 0) + q + 1


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
