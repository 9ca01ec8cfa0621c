"""The global row stream as a function of position: chunks of R rows, planned independently.

Chunk c holds global rows [c*R, (c+1)*R). Its documents are a pure function of c:

* from each source s it takes the stream indices k (see `SourceCursor.at`) whose running
  measure starts in [ceil(c*Q_s), ceil((c+1)*Q_s)): the measure of a sample is its planned
  length estimated from the index (caps, specials, truncation to seq_len; 0 for a sample that
  lacks a required modality) when mixing by tokens, or 1 per usable sample when mixing by
  samples. The budgets Q_s are computed once when the run starts (`budgets`) and saved in the
  loader state, so they never depend on the world size or on a later job's data config;
* every document is planned with the chunk's first row, c*R, as its row (the transitive
  objective's start row is compared with it);
* the documents are packed into exactly R rows, best fit decreasing; those that fit nowhere
  (the chunk's overflow) go to chunk c+1, which places them in the room left after its own
  documents. What does not fit there either is dropped and counted (`Chunk.dropped`).
  Rows are then put in a seeded order (chunk-local), so long and short documents spread over
  the ranks that share a chunk.

So chunk c needs only chunks c and c-1 planned; a rank plans the chunks holding its own rows and
their predecessors, whatever the world size, and a loader worker only its own micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loretta.data.mixing import Lru, SourceCursor, SourceOrder
from loretta.data.packing import Rows
from loretta.data.sequences import DocPlan, SequenceBuilder, mix64
from loretta.errors import DataError

# (source, sample, epoch, lengths per modality, 64-bit hash, global row) -> plan or None
DocPlanner = Callable[[int, int, int, np.ndarray, int, int], "DocPlan | None"]

STATE_VERSION = 2


@dataclass
class SourceMeta:
    """What the planner needs from a source: token counts per sample and shard sizes."""

    name: str
    lengths: np.ndarray  # (n_samples, n_modalities)
    shard_counts: list[int]
    weight: float
    required: list[int] = field(default_factory=list)  # modality indices every sample must have
    allowed: np.ndarray | None = None  # (n_modalities,) bool mask of modalities to use
    where: Callable[[int], str] = str


@dataclass
class Chunk:
    rows: list[list[DocPlan]]
    dropped_docs: list[DocPlan]  # documents of chunk c-1's overflow that fit nowhere here either
    skipped: dict[str, int]  # bad samples among this chunk's own documents, by reason
    overflow: int  # own documents moved to chunk c+1

    @property
    def dropped(self) -> int:
        return len(self.dropped_docs)


def estimated_lengths(meta: SourceMeta, builder: SequenceBuilder) -> np.ndarray:
    """Planned length of every sample of a plain document, from the index alone (vectorised):
    specials + sum(1 + min(n, cap)) over the used modalities, at most seq_len; 0 for a sample
    that lacks a required modality or has none. In blocks, so that a source of 10^8 samples
    needs no temporaries of its whole size."""
    lengths = np.asarray(meta.lengths)
    out = np.zeros(len(lengths), dtype=np.int32)  # at most seq_len
    if lengths.ndim != 2:
        return out
    caps = np.asarray(builder.caps, dtype=np.int64)[None, :]
    allowed = None if meta.allowed is None else np.asarray(meta.allowed, dtype=bool)[None, :]
    step = 1 << 20
    for a in range(0, len(lengths), step):
        L = lengths[a : a + step].astype(np.int64)
        if allowed is not None:
            L = np.where(allowed, L, 0)
        n = np.minimum(L, caps)
        present = n > 0
        est = builder.specials + np.where(present, 1 + n, 0).sum(axis=1)
        est = np.minimum(est, builder.seq_len)
        bad = ~present.any(axis=1)
        if meta.required:
            bad |= (L[:, meta.required] == 0).any(axis=1)
        est[bad] = 0
        out[a : a + step] = est
    return out


def measures(
    sources: list[SourceMeta], builder: SequenceBuilder, mix_by: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(measure per sample, estimated length per sample) of every source."""
    est = [estimated_lengths(s, builder) for s in sources]
    if mix_by == "tokens":
        return est, est
    return [(e > 0).astype(np.int32) for e in est], est


def budgets(
    sources: list[SourceMeta],
    est: list[np.ndarray],
    rows: int,
    seq_len: int,
    fill: float,
    mix_by: str,
) -> list[float]:
    """Measure per chunk of every source, so that a chunk's expected tokens are
    fill * rows * seq_len and the sources' shares follow their weights."""
    w = np.array([s.weight for s in sources], dtype=np.float64)
    tokens = fill * rows * seq_len
    if mix_by == "tokens":
        return (tokens * w / w.sum()).tolist()  # type: ignore[no-any-return]
    mean = np.array([e.sum() / max(1, int((e > 0).sum())) for e in est], dtype=np.float64)
    return (tokens * w / float((w * mean).sum())).tolist()  # type: ignore[no-any-return]


class ChunkStream:
    """Chunks of the global row stream, each planned from its index alone (small LRU cache)."""

    def __init__(
        self,
        sources: list[SourceMeta],
        builder: SequenceBuilder,
        seed: int,
        chunk_rows: int,
        fill: float,
        mix_by: str = "tokens",
        planner: DocPlanner | None = None,
        on_error: str = "raise",
        cache: int = 8,
    ) -> None:
        self.sources, self.builder, self.seed = sources, builder, seed
        self.on_error, self.mix_by = on_error, mix_by
        self.planner = planner or builder.plan
        self.cursors = [SourceCursor(s.shard_counts, seed, i) for i, s in enumerate(sources)]
        measure, self.est = measures(sources, builder, mix_by)
        self.orders = [SourceOrder(c, m) for c, m in zip(self.cursors, measure)]
        for i, (s, o) in enumerate(zip(sources, self.orders)):
            if o.total <= 0:
                raise DataError(
                    f"data.sources.{i} ({s.name}): no sample is usable (each lacks a modality "
                    f"the source requires, or has none); fix the data or data.sources.{i}."
                    "modalities"
                )
        self.rows_per_chunk = chunk_rows
        self.fill = fill
        self.budget = budgets(sources, self.est, chunk_rows, builder.seq_len, fill, mix_by)
        self._own: Lru = Lru(cache)  # c -> (Rows after own documents, overflow, skipped)
        self._chunks: Lru = Lru(cache)  # c -> Chunk
        self.planned_docs = 0  # planner calls (for tests and benchmarks)

    # ---- run-start parameters (saved in the loader state) ------------------------------------
    def params(self) -> dict[str, Any]:
        return {
            "chunk_rows": self.rows_per_chunk,
            "fill": self.fill,
            "mix_by": self.mix_by,
            "budget": list(self.budget),
        }

    def load_params(self, p: dict[str, Any]) -> None:
        self.rows_per_chunk = int(p["chunk_rows"])
        self.fill = float(p["fill"])
        self.mix_by = str(p["mix_by"])
        measure, self.est = measures(self.sources, self.builder, self.mix_by)
        self.orders = [SourceOrder(c, m) for c, m in zip(self.cursors, measure)]
        self.budget = [float(x) for x in p["budget"]]
        self._own.clear()
        self._chunks.clear()

    # ---- positions ---------------------------------------------------------------------------
    def first_index(self, s: int, c: int) -> int:
        """Source s's first stream index in chunk c."""
        return self.orders[s].first_at(math.ceil(c * self.budget[s]))

    # ---- planning ----------------------------------------------------------------------------
    def _skip(self, reason: str, where: str, counts: dict[str, int]) -> None:
        if self.on_error == "raise":
            raise DataError(f"{where}: {reason}. Fix the data, or set data.on_error=skip")
        counts[reason] = counts.get(reason, 0) + 1

    def documents(self, c: int) -> tuple[list[DocPlan], dict[str, int]]:
        """Chunk c's own documents, planned (source by source, in stream order)."""
        docs: list[DocPlan] = []
        skipped: dict[str, int] = {}
        row = c * self.rows_per_chunk
        names = self.builder.layout.names
        for s, src in enumerate(self.sources):
            for epoch, idx in self.cursors[s].span(
                self.first_index(s, c), self.first_index(s, c + 1)
            ):
                lengths = src.lengths[idx]
                if src.allowed is not None:
                    lengths = np.where(src.allowed, lengths, 0)
                missing = [m for m in src.required if lengths[m] == 0]
                if missing:
                    self._skip(
                        f"missing modality {[names[m] for m in missing]}", src.where(idx), skipped
                    )
                    continue
                self.planned_docs += 1
                plan = self.planner(s, idx, epoch, lengths, mix64(self.seed, s, epoch, idx), row)
                if plan is None:
                    self._skip("no modality block fits in data.seq_len", src.where(idx), skipped)
                    continue
                docs.append(plan)
        return docs, skipped

    def _own_packing(self, c: int) -> tuple[Rows, list[DocPlan], dict[str, int]]:
        hit = self._own.hit(c)
        if hit is None:
            docs, skipped = self.documents(c)
            rows = Rows(self.rows_per_chunk, self.builder.seq_len)
            overflow = rows.pack(docs)
            hit = self._own.put(c, (rows, overflow, skipped))
        return hit  # type: ignore[no-any-return]

    def chunk(self, c: int) -> Chunk:
        hit = self._chunks.hit(c)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        own, overflow, skipped = self._own_packing(c)
        rows = own.copy()
        dropped: list[DocPlan] = []
        if c > 0:
            _, before, _ = self._own_packing(c - 1)
            dropped = rows.pack(before)
        order = np.random.default_rng([self.seed, 0xC7A2, c]).permutation(len(rows.rows))
        out = Chunk([rows.rows[i] for i in order], dropped, skipped, len(overflow))
        return self._chunks.put(c, out)  # type: ignore[no-any-return]

    def rows(self, first: int, n: int) -> list[list[DocPlan]]:
        """Global rows [first, first + n)."""
        R = self.rows_per_chunk
        return [list(self.chunk(i // R).rows[i % R]) for i in range(first, first + n)]

    def chunks_starting(self, first: int, n: int) -> list[int]:
        """The chunks whose first row lies in [first, first + n): each is reported once."""
        R = self.rows_per_chunk
        return list(range(-(-first // R), -(-(first + n) // R)))
