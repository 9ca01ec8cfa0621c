"""The training data path, composed from small stages:

    sources (index metadata) -> token mixer -> document planner -> packer -> global row stream
    global rows --(rank, worker slice)--> read shards -> write rows -> batch

The global row stream is a pure function of (seed, sources, weights, position): it uses only
the per-sample token counts from each dataset's index. Every DataLoader worker of every rank
runs the same (cheap) planner and materialises only its own rows, so the rows do not depend on
the number of workers, and the loader state (cursors, mixer counts, packing buffer: a small
dict) is the same on every rank. Restoring it at any data-parallel world size continues the
same global stream: nothing is repeated or skipped.

Global micro-batch group g holds rows [g*B*W, (g+1)*B*W) for micro batch B and world size W;
rank r takes rows [g*B*W + r*B, g*B*W + (r+1)*B). Worker w of N takes groups g = w (mod N).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loretta.config import DataConfig, TrainConfig
from loretta.data.mixing import SourceCursor, TokenMixer
from loretta.data.packing import Packer
from loretta.data.sequences import IGNORE, DocPlan, SequenceBuilder, mix64
from loretta.data.sources import open_dataset
from loretta.errors import DataError
from loretta.vocab import VocabLayout

log = logging.getLogger(__name__)

ROW_FIELDS = ("tokens", "positions", "doc_ids", "targets", "target_modality", "target_direction")

# (source, sample, epoch, lengths per modality, 64-bit hash, global row) -> plan or None
DocPlanner = Callable[[int, int, int, np.ndarray, int, int], "DocPlan | None"]
# (datasets, sequence builder, data-parallel world size) -> document planner
PlannerFactory = Callable[[list[Any], SequenceBuilder, int], DocPlanner]


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


class SkipBudgetExceeded(DataError):
    pass


class GlobalStream:
    """The global sequence of packed rows, as a pure function of its state."""

    def __init__(
        self,
        sources: list[SourceMeta],
        builder: SequenceBuilder,
        seed: int,
        lookahead: int,
        on_error: str = "raise",
        max_skipped: int = 1000,
        mix_by: str = "tokens",
        planner: DocPlanner | None = None,
    ) -> None:
        self.sources, self.builder, self.seed = sources, builder, seed
        self.cursors = [SourceCursor(s.shard_counts, seed, i) for i, s in enumerate(sources)]
        self.mixer = TokenMixer([s.weight for s in sources])
        self.packer = Packer(builder.seq_len, lookahead)
        self.on_error, self.max_skipped, self.mix_by = on_error, max_skipped, mix_by
        self.planner = planner or builder.plan
        self.rows = 0  # global rows produced
        self.skipped: dict[str, int] = {}

    def _skip(self, reason: str, where: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{where}: {reason}. Fix the data, or set data.on_error=skip")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if sum(self.skipped.values()) > self.max_skipped:
            raise SkipBudgetExceeded(
                f"more than data.max_skipped={self.max_skipped} bad samples skipped "
                f"({self.skipped}); last: {where}: {reason}"
            )

    def next_doc(self) -> DocPlan:
        for _ in range(1_000_000):
            s = self.mixer.choose()
            src, cur = self.sources[s], self.cursors[s]
            epoch, idx = cur.peek()
            cur.advance()
            lengths = src.lengths[idx]
            if src.allowed is not None:
                lengths = np.where(src.allowed, lengths, 0)
            missing = [m for m in src.required if lengths[m] == 0]
            if missing:
                names = [self.builder.layout.names[m] for m in missing]
                self._skip(f"missing modality {names}", src.where(idx))
                continue
            plan = self.planner(s, idx, epoch, lengths, mix64(self.seed, s, epoch, idx), self.rows)
            if plan is None:
                self._skip("no modality block fits in data.seq_len", src.where(idx))
                continue
            self.mixer.record(s, plan.length if self.mix_by == "tokens" else 1)
            return plan
        raise DataError("a million samples in a row were skipped: the data is unusable")

    def next_row(self) -> list[DocPlan]:
        self.rows += 1
        return self.packer.next_row(self.next_doc)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "cursors": [c.state_dict() for c in self.cursors],
            "mixer": self.mixer.state_dict(),
            "packer": self.packer.state_dict(),
            "skipped": dict(self.skipped),
            "sources": [s.name for s in self.sources],
            # decisions fixed when the run started (the transitive start row), so that they
            # do not depend on the world size or run.steps of a resumed job
            "planner": self.planner_state(),
        }

    def planner_state(self) -> dict[str, Any]:
        get = getattr(self.planner, "state_dict", None)
        return dict(get()) if get is not None else {}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        names = [src.name for src in self.sources]
        if s.get("sources") != names:
            raise DataError(
                f"loader state was saved for sources {s.get('sources')} but the config has "
                f"{names}; resume with the same data.sources (or start a new run)"
            )
        self.rows = int(s["rows"])
        for c, cs in zip(self.cursors, s["cursors"]):
            c.load_state_dict(cs)
        self.mixer.load_state_dict(s["mixer"])
        self.packer.load_state_dict(s["packer"])
        self.skipped = dict(s.get("skipped", {}))
        saved, load = s.get("planner"), getattr(self.planner, "load_state_dict", None)
        if load is not None:
            if saved:
                load(saved)
            else:
                log.warning(
                    "loader state without the planner's start-time decisions (saved by an "
                    "older version): the transitive start row is recomputed from this job's "
                    "world size and run.steps (%s); resume at the original world size and "
                    "run.steps to keep the same stream",
                    self.planner_state(),
                )


class RowWriter:
    """Materialises planned rows from the datasets.

    control: (metadata label key, seed) for the negative control: the prompt of every generated
    block is read from a sample of another class (a pure function of the document), so the
    pseudo-modality carries no information about this sample's class."""

    def __init__(
        self,
        datasets: list[Any],
        builder: SequenceBuilder,
        on_error: str,
        control: tuple[str, int] | None = None,
    ) -> None:
        self.datasets, self.builder, self.on_error = datasets, builder, on_error
        self.control = control
        self.read_errors = 0

    def _label(self, ds: Any, i: int) -> Any:
        assert self.control is not None
        meta = ds.meta(i)
        if self.control[0] not in meta:
            raise DataError(
                f"{ds.where(i)}: no {self.control[0]!r} in its metadata, which "
                "objective.control='other_class' needs (set objective.control_label_key)"
            )
        return meta[self.control[0]]

    def control_prompt(self, ds: Any, plan: DocPlan, modality: int) -> np.ndarray:
        """The `modality` array of a sample of another class than plan.sample (seeded)."""
        assert self.control is not None
        own = self._label(ds, plan.sample)
        h = mix64(self.control[1], 0xC0417201, plan.source, plan.epoch, plan.sample, modality)
        name = ds.layout.names[modality]
        for k in range(256):
            j = mix64(h, k) % len(ds)
            if ds.lengths[j][modality] > 0 and self._label(ds, j) != own:
                return np.array(ds.read(j, [name])[name])
        raise DataError(
            f"{ds.where(plan.sample)}: no sample of another class with {name!r} found for "
            "the negative control; the source needs at least two classes"
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


def global_stream(
    cfg: TrainConfig,
    datasets: list[Any],
    layout: VocabLayout,
    world: int = 1,
    planner_factory: PlannerFactory | None = None,
) -> tuple[GlobalStream, SequenceBuilder]:
    """The global stream of rows for `cfg` from its start (every rank slices this one)."""
    d = cfg.data
    builder = SequenceBuilder(layout, d.sequence, d.seq_len, cfg.run.seed)
    planner = planner_factory(datasets, builder, world) if planner_factory is not None else None
    stream = GlobalStream(
        source_metas(d, datasets),
        builder,
        cfg.run.seed,
        d.pack_lookahead,
        d.on_error,
        d.max_skipped,
        d.mix_by,
        planner,
    )
    return stream, builder


class RankStream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """One rank's batches: rows of the global stream, materialised by this rank's workers."""

    def __init__(
        self,
        cfg: TrainConfig,
        rank: int,
        world: int,
        state: dict[str, Any] | None = None,
        planner_factory: PlannerFactory | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.rank, self.world, self.state = cfg, rank, world, state
        self.planner_factory = planner_factory
        self.datasets, self.layout = open_sources(cfg.data, cfg.run.seed)

    def make_stream(self) -> tuple[GlobalStream, SequenceBuilder]:
        stream, builder = global_stream(
            self.cfg, self.datasets, self.layout, self.world, self.planner_factory
        )
        if self.state is not None:
            stream.load_state_dict(self.state)
        return stream, builder

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream, builder = self.make_stream()
        obj = self.cfg.objective
        control = (obj.control_label_key, self.cfg.run.seed) if obj.control != "none" else None
        writer = RowWriter(self.datasets, builder, self.cfg.data.on_error, control)
        B, W, r = self.cfg.data.micro_batch_size, self.world, self.rank
        group = 0
        while True:
            start_rows = stream.rows
            rows = [stream.next_row() for _ in range(B * W)]
            if group % n_workers == worker:
                batch = writer.write(rows[r * B : (r + 1) * B])
                batch["state"] = stream.state_dict()  # resume point: after this group
                batch["first_row"] = start_rows + r * B
                batch["read_errors"] = writer.read_errors
                batch["worker"] = worker
                batch["mix_tokens"] = stream.mixer.tokens.tolist()
                yield batch
            group += 1


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
