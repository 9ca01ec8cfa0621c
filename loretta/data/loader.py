"""The training data path, composed from small stages:

    sources (index metadata) -> per-source budgets -> chunk c: documents -> planner -> packer
    global rows of chunk c --(rank, worker slice)--> read shards -> write rows -> batch

The global row stream is a pure function of (seed, sources, weights, run-start parameters,
position): it is cut into chunks of R = data.plan_chunk_rows rows, and chunk c is planned from c
alone (loretta/data/chunks.py): its documents are the next budget's worth of each source's
seeded epoch order, found by random access from the index's token counts; they are planned
with the chunk's first row as their row, packed best fit decreasing into the R rows, and what
does not fit goes to chunk c+1 (what fits there neither is dropped and counted). So a rank
plans only the chunks holding its own rows and their predecessors: its cost does not grow
with the world size, and each DataLoader worker plans only its own micro-batches.

Global micro-batch group g holds rows [g*B*W, (g+1)*B*W) for micro batch B and world size W;
rank r takes rows [g*B*W + r*B, g*B*W + (r+1)*B). Worker w of N takes groups g = w (mod N).

The loader state (version 2) is small and the same on every rank: the global rows consumed,
the run-start parameters (chunk rows, fill, per-source budgets, the planner's start-time
decisions such as the transitive start row) and skip/drop counts. Restoring it at any world
size continues the same global rows. A state without version 2 (written by the sequential
planner before it) is refused with what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from loretta.config import DataConfig, TrainConfig
from loretta.data.chunks import STATE_VERSION, ChunkStream, DocPlanner, SourceMeta
from loretta.data.mixing import SourceCursor
from loretta.data.sequences import IGNORE, DocPlan, SequenceBuilder, mix64
from loretta.data.sources import open_dataset
from loretta.errors import DataError
from loretta.vocab import VocabLayout

log = logging.getLogger(__name__)

ROW_FIELDS = ("tokens", "positions", "doc_ids", "targets", "target_modality", "target_direction")

# (datasets, sequence builder, data-parallel world size) -> document planner
PlannerFactory = Callable[[list[Any], SequenceBuilder, int], DocPlanner]

__all__ = ["ChunkStream", "DocPlanner", "GlobalStream", "SourceMeta", "check_state"]


class SkipBudgetExceeded(DataError):
    pass


def check_state(s: Any) -> None:
    """Refuse a loader state this version cannot continue (with what to do instead)."""
    if not isinstance(s, dict) or s.get("version") != STATE_VERSION:
        v = s.get("version", 1) if isinstance(s, dict) else type(s).__name__
        raise DataError(
            f"loader state version {v} (written by an older loretta, whose global row stream "
            f"was planned sequentially) cannot be continued by this version, which plans the "
            f"stream in chunks (loader state version {STATE_VERSION}): start a new run "
            "(run.resume off, or another run.run_dir), or resume this checkpoint with the "
            "loretta version that wrote it"
        )


class SkipCounter:
    """Bad samples of the chunks a consumer reported (each chunk once), against the budget."""

    def __init__(self, max_skipped: int, start: dict[str, int] | None = None) -> None:
        self.max_skipped = max_skipped
        self.counts: dict[str, int] = dict(start or {})

    def add(self, counts: dict[str, int], where: str) -> None:
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if counts and sum(self.counts.values()) > self.max_skipped:
            raise SkipBudgetExceeded(
                f"more than data.max_skipped={self.max_skipped} bad samples skipped "
                f"({self.counts}); last in {where}"
            )


class GlobalStream:
    """The global sequence of rows walked in order: the reference every rank's slice is
    checked against (tests, tools). Each row comes from `ChunkStream`, so it equals what any
    rank at any world size plans for that position."""

    def __init__(self, chunks: ChunkStream, max_skipped: int = 1000) -> None:
        self.chunks = chunks
        self.sources, self.builder = chunks.sources, chunks.builder
        self.rows = 0  # global rows produced
        self.dropped = 0  # overflow documents dropped in the chunks walked
        self.dropped_docs: list[DocPlan] = []  # which (walked from the start only)
        self._skips = SkipCounter(max_skipped)
        self._counted = -1  # last chunk whose counts were added
        # per source: the stream position of the current chunk's first document
        self.cursors = [
            SourceCursor(s.shard_counts, chunks.seed, i) for i, s in enumerate(self.sources)
        ]
        self.tokens = np.zeros(len(self.sources), dtype=np.int64)  # per source, rows returned

    @property
    def skipped(self) -> dict[str, int]:
        return self._skips.counts

    @property
    def planner(self) -> DocPlanner:
        return self.chunks.planner

    def next_row(self) -> list[DocPlan]:
        R = self.chunks.rows_per_chunk
        c = self.rows // R
        ch = self.chunks.chunk(c)
        if c > self._counted:
            self._counted = c
            self.dropped += ch.dropped
            self.dropped_docs += ch.dropped_docs
            self._skips.add(ch.skipped, f"chunk {c}")
            for s, cur in enumerate(self.cursors):
                cur.seek(self.chunks.first_index(s, c))
        row = list(ch.rows[self.rows % R])
        for d in row:
            self.tokens[d.source] += d.length
        self.rows += 1
        return row

    def realised(self) -> list[float]:
        """Token share per source of the rows returned so far."""
        total = self.tokens.sum()
        return (self.tokens / total).tolist() if total else [0.0] * len(self.tokens)

    def state_dict(self) -> dict[str, Any]:
        return stream_state(self.chunks, self.rows, self.skipped, self.dropped)

    def load_state_dict(self, s: dict[str, Any]) -> None:
        load_stream_state(self.chunks, s)
        self.rows = int(s["rows"])
        self._skips = SkipCounter(self._skips.max_skipped, s.get("skipped", {}))
        self.dropped = int(s.get("dropped", 0))
        R = self.chunks.rows_per_chunk
        # a chunk started before the resume point was counted before it
        self._counted = (self.rows + R - 1) // R - 1


def stream_state(
    chunks: ChunkStream, rows: int, skipped: dict[str, int], dropped: int
) -> dict[str, Any]:
    """The loader state at global row `rows`: small, and the same on every rank."""
    get = getattr(chunks.planner, "state_dict", None)
    return {
        "version": STATE_VERSION,
        "rows": rows,
        "sources": [s.name for s in chunks.sources],
        # fixed when the run started, so that nothing depends on the world size or on the
        # data config of a resumed job: chunk size, fill, per-source budgets ...
        "plan": chunks.params(),
        # ... and the planner's decisions (the transitive start row)
        "planner": dict(get()) if get is not None else {},
        "skipped": dict(skipped),  # bad samples in the chunks this rank's worker reported
        "dropped": dropped,  # overflow documents dropped in those chunks
    }


def load_stream_state(chunks: ChunkStream, s: dict[str, Any]) -> None:
    check_state(s)
    names = [src.name for src in chunks.sources]
    if s.get("sources") != names:
        raise DataError(
            f"loader state was saved for sources {s.get('sources')} but the config has "
            f"{names}; resume with the same data.sources (or start a new run)"
        )
    if s["plan"]["chunk_rows"] != chunks.rows_per_chunk or s["plan"]["fill"] != chunks.fill:
        log.info(
            "loader state: the stream continues with the chunking it started with (%s), not "
            "this config's data.plan_chunk_rows=%s, data.plan_fill=%s",
            s["plan"],
            chunks.rows_per_chunk,
            chunks.fill,
        )
    chunks.load_params(s["plan"])
    load = getattr(chunks.planner, "load_state_dict", None)
    if load is not None and s.get("planner"):
        load(s["planner"])


class RowWriter:
    """Materialises planned rows from the datasets.

    control: (mode, metadata label key, seed) for a negative control: the prompt of every
    generated block is read from another sample (a pure function of the document), of another
    class ('other_class') or of any class ('any_sample'), so the pseudo-modality carries no
    information about this sample's class."""

    def __init__(
        self,
        datasets: list[Any],
        builder: SequenceBuilder,
        on_error: str,
        control: tuple[str, str, int] | None = None,
    ) -> None:
        self.datasets, self.builder, self.on_error = datasets, builder, on_error
        self.control = control
        self.read_errors = 0

    def _label(self, ds: Any, i: int) -> Any:
        assert self.control is not None
        key = self.control[1]
        meta = ds.meta(i)
        if key not in meta:
            raise DataError(
                f"{ds.where(i)}: no {key!r} in its metadata, which "
                "objective.control='other_class' needs (set objective.control_label_key)"
            )
        return meta[key]

    def control_prompt(self, ds: Any, plan: DocPlan, modality: int) -> np.ndarray:
        """The `modality` array of another sample than plan.sample (seeded): of another class
        for 'other_class', of any class for 'any_sample'."""
        assert self.control is not None
        mode, _, seed = self.control
        own = self._label(ds, plan.sample) if mode == "other_class" else None
        h = mix64(seed, 0xC0417201, plan.source, plan.epoch, plan.sample, modality)
        name = ds.layout.names[modality]
        for k in range(256):
            j = mix64(h, k) % len(ds)
            if j == plan.sample or ds.lengths[j][modality] == 0:
                continue
            if mode == "any_sample" or self._label(ds, j) != own:
                return np.array(ds.read(j, [name])[name])
        need, least = (
            ("of another class", "classes") if mode == "other_class" else ("other", "samples")
        )
        raise DataError(
            f"{ds.where(plan.sample)}: no {need} sample with {name!r} found for the negative "
            f"control {mode!r}; the source needs at least two {least}"
        )

    def empty(self, n_rows: int) -> dict[str, np.ndarray]:
        T = self.builder.seq_len
        pad = self.builder.layout.pad_id
        return {
            "tokens": np.full((n_rows, T), pad, dtype=np.int64),
            "positions": np.zeros((n_rows, T), dtype=np.int64),
            "doc_ids": np.zeros((n_rows, T), dtype=np.int64),
            "targets": np.full((n_rows, T), IGNORE, dtype=np.int64),
            "target_modality": np.full((n_rows, T), -1, dtype=np.int64),
            "target_direction": np.full((n_rows, T), -1, dtype=np.int64),
        }

    def write(self, rows: list[list[DocPlan]]) -> dict[str, Any]:
        out = self.empty(len(rows))
        docs, gen_docs, bad = [], [], []
        blocks: list[list[list[int]]] = []  # per document: (modality, n, gen_from) per block
        for r, row in enumerate(rows):
            view = {k: v[r] for k, v in out.items()}
            pos = 0
            for d, plan in enumerate(row):
                try:
                    ds = self.datasets[plan.source]
                    names = ds.layout.names
                    want = {b.modality for b in plan.blocks if b.gen_from < 0}
                    want |= {b.gen_from for b in plan.blocks if b.gen_from >= 0}
                    raw = ds.read(plan.sample, [names[m] for m in sorted(want)])
                    arrays = {names.index(k): v for k, v in raw.items()}
                    for m in want:
                        if m not in arrays:
                            raise DataError(
                                f"{ds.where(plan.sample)}: modality {names[m]!r} is missing "
                                "although the index lists it"
                            )
                    if self.builder.write_doc(plan, arrays, view, pos, d):
                        # generated blocks: the objective fills them before the forward pass
                        own = {m: a.copy() for m, a in arrays.items()}  # detach from the mmap
                        if self.control is not None:
                            for b in plan.blocks:
                                if b.gen_from >= 0:
                                    own[b.gen_from] = self.control_prompt(ds, plan, b.gen_from)
                        gen_docs.append((r, pos, d, plan, own))
                    docs.append((r, plan.source, plan.sample, plan.epoch))
                    blocks.append([list(b) for b in plan.blocks])
                except DataError:
                    if self.on_error == "raise":
                        raise
                    # skip policy: the document's slice is padding again, whatever was written
                    # of it, and it is counted, not listed among the documents trained on
                    self.read_errors += 1
                    span = slice(pos, pos + plan.length)
                    for k, v in self.empty(1).items():
                        view[k][span] = v[0, : plan.length]
                    view["doc_ids"][span] = d
                    bad.append((r, plan.source, plan.sample, plan.epoch))
                pos += plan.length
            if pos < self.builder.seq_len:  # padding is its own document
                view["doc_ids"][pos:] = len(row)
                view["positions"][pos:] = np.arange(self.builder.seq_len - pos)
        batch: dict[str, Any] = dict(out)
        batch["docs"] = np.asarray(docs, dtype=np.int64).reshape(
            -1, 4
        )  # row, source, sample, epoch
        batch["skipped_docs"] = np.asarray(bad, dtype=np.int64).reshape(-1, 4)
        batch["doc_blocks"] = blocks
        batch["gen_docs"] = gen_docs  # (row, start, doc index, plan, {modality: local ids})
        return batch


def open_sources(cfg: DataConfig, seed: int) -> tuple[list[Any], VocabLayout]:
    """Open every source (writing the synthetic ones whose path is `synthetic:FOLDER` on first
    use); check they share one layout."""
    from loretta.data.synthetic import source_path

    datasets, layout = [], None
    for i, s in enumerate(cfg.sources):
        path = source_path(s, f"data.sources.{i}")
        ds = open_dataset(path, cfg.cache_dir, cfg.verify_checksums, cfg.fetch_options())
        if layout is None:
            layout = ds.layout
        else:
            layout.check_same(
                ds.layout, f"data.sources.0 ({cfg.sources[0].path})", f"data.sources.{i} ({s.path})"
            )
        for name in s.modalities:
            if name not in ds.layout:
                raise DataError(
                    f"data.sources.{i}.modalities: {name!r} is not in the dataset's layout "
                    f"{ds.layout.names} ({s.path})"
                )
        datasets.append(ds)
    assert layout is not None
    for m in layout.modalities:
        if m.fixed_length is not None and m.fixed_length + 3 > cfg.seq_len:
            raise DataError(
                f"data.seq_len={cfg.seq_len} cannot hold one {m.name} block of its fixed length "
                f"{m.fixed_length} (+ specials); raise data.seq_len"
            )
    return datasets, layout


def source_metas(cfg: DataConfig, datasets: list[Any]) -> list[SourceMeta]:
    metas = []
    for s, ds in zip(cfg.sources, datasets):
        names = ds.layout.names
        allowed = None
        required: list[int] = []
        if s.modalities:
            allowed = np.array([n in s.modalities for n in names])
            required = [names.index(m) for m in s.modalities]
        metas.append(
            SourceMeta(
                name=s.name,
                lengths=ds.lengths,
                shard_counts=ds.shard_counts,
                weight=s.weight,
                required=required,
                allowed=allowed,
                where=ds.where,
            )
        )
    return metas


def chunk_stream(
    cfg: TrainConfig,
    datasets: list[Any],
    layout: VocabLayout,
    world: int = 1,
    planner_factory: PlannerFactory | None = None,
) -> tuple[ChunkStream, SequenceBuilder]:
    """The position-addressable global stream for `cfg` from its start."""
    d = cfg.data
    builder = SequenceBuilder(layout, d.sequence, d.seq_len, cfg.run.seed)
    planner = planner_factory(datasets, builder, world) if planner_factory is not None else None
    chunks = ChunkStream(
        source_metas(d, datasets),
        builder,
        cfg.run.seed,
        d.plan_chunk_rows,
        d.plan_fill,
        d.mix_by,
        planner,
        d.on_error,
    )
    return chunks, builder


def global_stream(
    cfg: TrainConfig,
    datasets: list[Any],
    layout: VocabLayout,
    world: int = 1,
    planner_factory: PlannerFactory | None = None,
) -> tuple[GlobalStream, SequenceBuilder]:
    """The global stream of rows for `cfg` from its start, walked in order (the reference
    every rank's slice is checked against)."""
    chunks, builder = chunk_stream(cfg, datasets, layout, world, planner_factory)
    return GlobalStream(chunks, cfg.data.max_skipped), builder


class RankStream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """One rank's batches: rows of the global stream, planned and materialised by this rank's
    workers. A worker plans only the chunks holding its own rows (and their predecessors)."""

    def __init__(
        self,
        cfg: TrainConfig,
        rank: int,
        world: int,
        state: dict[str, Any] | None = None,
        planner_factory: PlannerFactory | None = None,
    ) -> None:
        super().__init__()
        if state is not None:
            check_state(state)  # here, in the trainer's process, not in a worker
        self.cfg, self.rank, self.world, self.state = cfg, rank, world, state
        self.planner_factory = planner_factory
        self.datasets, self.layout = open_sources(cfg.data, cfg.run.seed)

    def make_stream(self) -> tuple[ChunkStream, SequenceBuilder]:
        chunks, builder = chunk_stream(
            self.cfg, self.datasets, self.layout, self.world, self.planner_factory
        )
        if self.state is not None:
            load_stream_state(chunks, self.state)
        return chunks, builder

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        chunks, builder = self.make_stream()
        obj = self.cfg.objective
        control = (
            (obj.control, obj.control_label_key, self.cfg.run.seed)
            if obj.control != "none"
            else None
        )
        writer = RowWriter(self.datasets, builder, self.cfg.data.on_error, control)
        B, W, r = self.cfg.data.micro_batch_size, self.world, self.rank
        state = self.state or {}
        start = int(state.get("rows", 0))
        skips = SkipCounter(self.cfg.data.max_skipped, state.get("skipped", {}))
        dropped = int(state.get("dropped", 0))
        group = worker
        while True:
            first = start + group * B * W + r * B
            rows = chunks.rows(first, B)
            # chunks that start in this batch's rows: their counts are reported here, once
            mine = [chunks.chunk(c) for c in chunks.chunks_starting(first, B)]
            n_dropped = sum(ch.dropped for ch in mine)
            for ch in mine:
                skips.add(ch.skipped, f"rows {first}..{first + B - 1}")
            dropped += n_dropped
            batch = writer.write(rows)
            # resume point: after this group
            batch["state"] = stream_state(
                chunks, start + (group + 1) * B * W, skips.counts, dropped
            )
            batch["first_row"] = first
            batch["read_errors"] = writer.read_errors
            batch["worker"] = worker
            batch["overflow_dropped"] = n_dropped
            mix = np.zeros(len(chunks.sources), dtype=np.int64)  # tokens per source, this batch
            for row in rows:
                for d in row:
                    mix[d.source] += d.length
            batch["mix_tokens"] = mix.tolist()
            yield batch
            group += n_workers


def collate(batch: Any) -> dict[str, Any]:
    out = dict(batch)
    for k in ROW_FIELDS:
        out[k] = torch.from_numpy(batch[k])
    return out


def build_loader(
    cfg: TrainConfig,
    rank: int,
    world: int,
    state: dict[str, Any] | None = None,
    planner_factory: PlannerFactory | None = None,
) -> tuple[torch.utils.data.DataLoader, RankStream]:  # type: ignore[type-arg]
    ds = RankStream(cfg, rank, world, state, planner_factory)
    nw = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        num_workers=nw,
        collate_fn=collate,
        prefetch_factor=cfg.data.prefetch_factor if nw > 0 else None,
        persistent_workers=False,
    )
    return loader, ds
