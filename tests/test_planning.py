"""The chunked global stream: every chunk is a function of its position, so a rank's planning
does not grow with the world size or shrink with nothing when loader workers are added; resume
at any world size continues the same rows; the loader state is versioned."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loretta.config import SequenceConfig, SourceConfig, load_config
from loretta.data.chunks import ChunkStream, SourceMeta
from loretta.data.loader import GlobalStream, build_loader, global_stream, open_sources
from loretta.data.mixing import SourceCursor, SourceOrder
from loretta.data.sequences import SequenceBuilder
from loretta.data.shards import write_dataset
from loretta.errors import DataError
from loretta.vocab import VocabLayout

LAYOUT = VocabLayout.build({"a": 50, "b": 70, "img": 16}, fixed_lengths={"img": 12})
T = 128


def metas(n: int = 4000, weights: tuple[float, ...] = (0.5, 0.3, 0.2)) -> list[SourceMeta]:
    """Three in-memory sources: short text, long text, image + caption."""
    rng = np.random.default_rng(0)
    z = np.zeros(n, np.int64)
    short = np.clip(rng.lognormal(np.log(8), 0.6, n), 1, 500).astype(np.int64)
    long_ = np.clip(rng.lognormal(np.log(50), 0.8, n), 1, 500).astype(np.int64)
    cap = rng.integers(2, 10, n)
    shards = [700] * (n // 700) + [n % 700]
    return [
        SourceMeta("short", np.stack([short, short // 2, z], 1), shards, weights[0]),
        SourceMeta("long", np.stack([long_, z, z], 1), shards, weights[1]),
        SourceMeta("img", np.stack([z, cap, np.full(n, 12)], 1), shards, weights[2]),
    ]


def builder() -> SequenceBuilder:
    return SequenceBuilder(LAYOUT, SequenceConfig(), T, seed=0)


def stream(rows: int = 8, fill: float = 0.95, **kw: Any) -> ChunkStream:
    return ChunkStream(kw.pop("sources", None) or metas(), builder(), 0, rows, fill, **kw)


def key(rows: list[list[Any]]) -> list[list[tuple[Any, ...]]]:
    return [[(d.source, d.sample, d.epoch, d.blocks) for d in row] for row in rows]


# ---- random access ---------------------------------------------------------------------------
def test_random_access_equals_the_sequential_walk() -> None:
    walk, jump = SourceCursor([5, 0, 9, 3], 7, 1), SourceCursor([5, 0, 9, 3], 7, 1)
    seq = []
    for _ in range(17 * 3 + 4):
        seq.append(walk.peek())
        walk.advance()
    assert [jump.at(k) for k in reversed(range(len(seq)))] == seq[::-1]
    for k0, k1 in ((0, len(seq)), (3, 4), (5, 30), (16, 40), (17, 17), (33, 55)):
        assert jump.span(k0, k1) == seq[k0:k1], (k0, k1)
    measure = np.array([3, 0, 1, 4, 0, 0, 2, 5, 1, 0, 2, 1, 0, 3, 1, 0, 2], np.int64)
    order = SourceOrder(SourceCursor([5, 0, 9, 3], 7, 1), measure)
    running = [0]
    for k in range(17 * 3):
        running.append(running[-1] + int(measure[walk.at(k)[1]]))
    for t in range(0, running[-1]):
        assert order.first_at(t) == next(k for k, p in enumerate(running) if p >= t), t


# ---- chunks are functions of their position --------------------------------------------------
def test_a_chunk_planned_alone_equals_the_sequential_walk() -> None:
    ref = GlobalStream(stream())
    walked = [ref.next_row() for _ in range(8 * 12)]
    alone = stream()
    assert key(alone.rows(7 * 8, 8)) == key(walked[56:64])  # chunk 7 alone, nothing before
    later = stream(cache=1)
    for c in (11, 3, 7, 0, 9):  # any order, a one-chunk cache
        assert key(later.rows(c * 8, 8)) == key(walked[c * 8 : (c + 1) * 8]), c
    # a rank's rows at any world size (or worker) are a slice of it
    for world in (1, 3, 6):
        for r in range(world):
            s = stream()
            for g in range(96 // (4 * world)):
                first = g * 4 * world + r * 4
                assert key(s.rows(first, 4)) == key(walked[first : first + 4])


def test_planning_per_rank_does_not_grow_with_world_size() -> None:
    """Planner calls for one rank's rows: equal within the predecessor chunks' share at W=8
    and W=512, and 4 workers of a rank each plan a quarter of them."""
    B, groups = 8, 12

    def calls(world: int, workers: int = 1) -> list[int]:
        out = []
        for w in range(workers):
            s = stream()
            for g in range(w, groups, workers):
                s.rows(g * B * world + (world // 2) * B, B)
            out.append(s.planned_docs)
        return out

    small, big = calls(8)[0], calls(512)[0]
    assert 0.75 < big / small < 1.33, (small, big)  # not x64
    per_chunk = stream().planned_docs or len(stream().documents(0)[0])
    assert big <= groups * 2 * 2 * per_chunk  # own chunk + predecessor, no more
    four = calls(512, 4)
    assert max(four) <= 0.4 * big, (four, big)  # a worker plans only its own groups


# ---- mixing and overflow ---------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (0.1, 0.1, 0.8)])
def test_token_shares_track_weights_over_many_chunks(weights: tuple[float, ...]) -> None:
    ref = GlobalStream(stream(sources=metas(weights=weights)))
    for _ in range(8 * 300):
        ref.next_row()
    w = np.array(weights) / sum(weights)
    assert np.abs(np.array(ref.realised()) - w).max() <= 0.02, (ref.realised(), w)


def test_overflow_drops_are_counted() -> None:
    """One-row chunks filled to the brim: documents overflow, some fit nowhere. Every planned
    document is placed exactly once or counted as dropped (or waits in the last overflow)."""
    s = stream(rows=1, fill=1.0)
    n = 300
    placed = Counter(
        (d.source, d.sample, d.epoch) for c in range(n) for row in s.chunk(c).rows for d in row
    )
    planned = Counter((d.source, d.sample, d.epoch) for c in range(n) for d in s.documents(c)[0])
    dropped = sum(s.chunk(c).dropped for c in range(n))
    waiting = len(s._own_packing(n - 1)[1])  # chunk n-1's overflow, for chunk n to place
    assert dropped > 0
    assert max(placed.values()) == 1 and not placed - planned
    assert sum(planned.values()) == sum(placed.values()) + dropped + waiting
    ref = GlobalStream(stream(rows=1, fill=1.0))
    for _ in range(n):
        ref.next_row()
    assert ref.dropped == dropped and ref.state_dict()["dropped"] == dropped


def test_a_source_with_no_usable_sample_is_named() -> None:
    bad = metas()
    bad[1].required = [1]  # "long" has no b anywhere: it could never fill its budget
    with pytest.raises(DataError, match=r"data.sources.1 \(long\): no sample is usable"):
        stream(sources=bad)


def test_default_chunking_packs_well_and_rarely_drops() -> None:
    """The config's defaults (rows of 128 here: coarser than 2048, so harder to pack)."""
    from loretta.config import DataConfig

    d = DataConfig()
    ref = GlobalStream(stream(rows=d.plan_chunk_rows, fill=d.plan_fill))
    used, n = 0, d.plan_chunk_rows * 200
    for _ in range(n):
        used += sum(d.length for d in ref.next_row())
    assert ref.dropped <= 0.005 * ref.chunks.planned_docs, (ref.dropped, ref.chunks.planned_docs)
    assert used / (n * T) > 0.95


# ---- the loader: elastic resume and the versioned state ----------------------------------------
def _samples(n: int, lens: tuple[int, int], seed: int, prefix: str) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "key": f"{prefix}{i:05d}",
            "a": rng.integers(0, 50, int(rng.integers(*lens))),
            "b": rng.integers(0, 70, int(rng.integers(*lens))),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("plan")
    lay = VocabLayout.build({"a": 50, "b": 70})
    write_dataset(_samples(400, (4, 12), 1, "x"), root / "x", lay, samples_per_shard=60)
    write_dataset(_samples(200, (20, 60), 2, "y"), root / "y", lay, samples_per_shard=50)
    return root / "x", root / "y"


def cfg_for(data: tuple[Path, Path], **over: Any) -> Any:
    o = [f"--data.sources.0.path={data[0]}", "--data.micro_batch_size=4"]
    cfg = load_config("tiny", o + [f"--{k}={v}" for k, v in over.items()])
    cfg.data.sources = [
        SourceConfig(name="x", path=str(data[0]), weight=0.4),
        SourceConfig(name="y", path=str(data[1]), weight=0.6),
    ]
    return cfg


@pytest.mark.parametrize(("old", "new"), [(2, 4), (4, 2)])
def test_elastic_resume_audit(data: tuple[Path, Path], old: int, new: int) -> None:
    cfg = cfg_for(data)
    B, stop, after = cfg.data.micro_batch_size, 3, 4
    consumed = []
    state = None
    for r in range(old):
        it = iter(build_loader(cfg, r, old)[0])
        for _ in range(stop):
            b = next(it)
            consumed += [tuple(x) for x in b["docs"][:, 1:].tolist()]
        state = json.loads(json.dumps(b["state"]))  # as stored in a checkpoint
    assert state is not None and state["version"] == 2 and state["rows"] == B * old * stop
    assert len(json.dumps(state)) < 2000  # small: no cursors, buffers or per-row data
    # the resumed job's config asks for other chunks: the stream keeps the ones it started with
    later = cfg_for(data, **{"data.plan_chunk_rows": 3, "data.plan_fill": 0.8})
    for r in range(new):
        it = iter(build_loader(later, r, new, state)[0])
        for _ in range(after):
            consumed += [tuple(x) for x in next(it)["docs"][:, 1:].tolist()]
    ref, _ = global_stream(cfg, *open_sources(cfg.data, cfg.run.seed))
    n_rows = B * (old * stop + new * after)
    expect = [(d.source, d.sample, d.epoch) for _ in range(n_rows) for d in ref.next_row()]
    assert Counter(consumed) == Counter(expect)  # nothing repeated, nothing skipped
    assert max(Counter(consumed).values()) == 1


def test_old_loader_state_is_refused(data: tuple[Path, Path]) -> None:
    cfg = cfg_for(data)
    old = {
        "rows": 64,
        "cursors": [[0, 3], [0, 5]],
        "mixer": {},
        "packer": [],
        "sources": ["x", "y"],
    }
    with pytest.raises(DataError, match=r"loader state version 1 .*start a new run.*version that"):
        build_loader(cfg, 0, 1, old)
    ref, _ = global_stream(cfg, *open_sources(cfg.data, cfg.run.seed))
    with pytest.raises(DataError, match="version 1"):
        ref.load_state_dict(old)


def test_batches_report_overflow_drops_once(data: tuple[Path, Path]) -> None:
    cfg = cfg_for(data, **{"data.plan_chunk_rows": 1, "data.plan_fill": 1.0})
    world, groups = 2, 10
    reported = 0
    for r in range(world):
        it = iter(build_loader(cfg, r, world)[0])
        reported += sum(int(next(it)["overflow_dropped"]) for _ in range(groups))
    ref, _ = global_stream(cfg, *open_sources(cfg.data, cfg.run.seed))
    for _ in range(cfg.data.micro_batch_size * world * groups):
        ref.next_row()
    assert reported == ref.dropped > 0
