"""The data path: shard format, exact-once coverage over (rank, worker), token-weighted mixing,
packing, exact and elastic resume, and bad data."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import reference_stream

from loretta.config import SequenceConfig, load_config
from loretta.data.loader import build_loader, open_sources
from loretta.data.sequences import IGNORE, SequenceBuilder
from loretta.data.shards import ShardDataset, write_dataset
from loretta.errors import DataError
from loretta.vocab import VocabLayout

LAYOUT = VocabLayout.build({"a": 50, "b": 70})


def samples(
    n: int, lens: tuple[int, int] = (5, 40), seed: int = 0, prefix: str = "s", both: bool = True
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s: dict[str, Any] = {"key": f"{prefix}{i:06d}", "meta": {"i": i}}
        s["a"] = rng.integers(0, 50, int(rng.integers(*lens)))
        if both or i % 2:
            s["b"] = rng.integers(0, 70, int(rng.integers(*lens)))
        out.append(s)
    return out


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    short = root / "short"
    long_ = root / "long"
    write_dataset(samples(600, (4, 12), seed=1, prefix="x"), short, LAYOUT, samples_per_shard=100)
    write_dataset(samples(300, (40, 90), seed=2, prefix="y"), long_, LAYOUT, samples_per_shard=70)
    return short, long_


def cfg_for(paths: list[Path], weights: list[float] | None = None, **over: Any) -> Any:
    o = [f"--data.sources.{i}.path={p}" for i, p in enumerate(paths[:1])]
    cfg = load_config("tiny", o + [f"--{k}={v}" for k, v in over.items()])
    from loretta.config import SourceConfig

    cfg.data.sources = [
        SourceConfig(name=f"s{i}", path=str(p), weight=(weights or [1.0] * len(paths))[i])
        for i, p in enumerate(paths)
    ]
    return cfg


# ---- format ------------------------------------------------------------------------------------
def test_shards_hold_one_npy_per_modality_and_json(tmp_path: Path) -> None:
    m = write_dataset(samples(30, both=False), tmp_path / "ds", LAYOUT, samples_per_shard=8)
    assert [s.samples for s in m.shards] == [8, 8, 8, 6]
    with tarfile.open(tmp_path / "ds" / m.shards[0].name) as tf:
        names = tf.getnames()
    assert names[:3] == ["s000000.a.npy", "s000000.json", "s000001.a.npy"]
    assert "s000001.b.npy" in names
    man = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert man["samples"] == 30 and man["layout"]["modalities"][1]["name"] == "b"
    ds = ShardDataset(str(tmp_path / "ds"))
    for i in (0, 1, 29):
        got = ds.read(i)
        key = ds.key(i)
        src = samples(30, both=False)[int(key[1:])]
        assert set(got) == ({"a", "b"} if "b" in src else {"a"})
        assert np.array_equal(got["a"], src["a"])
        assert ds.meta(i) == {"i": int(key[1:])}


def test_write_is_atomic_and_refuses_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"

    def bad() -> Any:
        yield from samples(5)
        yield {"key": "oops", "a": np.array([999])}  # id out of range -> error mid-write

    with pytest.raises(DataError, match=r"ids span \[999, 999\].*50 ids"):
        write_dataset(bad(), out, LAYOUT, samples_per_shard=2)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    write_dataset(samples(5), out, LAYOUT)
    with pytest.raises(DataError, match="already exists"):
        write_dataset(samples(5), out, LAYOUT)


def test_parallel_writing_equals_sequential(tmp_path: Path) -> None:
    a = write_dataset(samples(50), tmp_path / "a", LAYOUT, samples_per_shard=10, workers=1)
    b = write_dataset(samples(50), tmp_path / "b", LAYOUT, samples_per_shard=10, workers=2)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


# ---- sequences ---------------------------------------------------------------------------------
def test_sequence_layout_targets_and_directions(tiny_data: Path) -> None:
    cfg = load_config("tiny", [f"--data.sources.0.path={tiny_data}"])
    loader, _ = build_loader(cfg, 0, 1)
    batch = next(iter(loader))
    lay = VocabLayout.build({"a": 64, "b": 64})
    tok, tgt, doc, pos = (
        batch["tokens"][0],
        batch["targets"][0],
        batch["doc_ids"][0],
        batch["positions"][0],
    )
    start = 0
    while start < len(tok) and tok[start] == lay.bos_id:
        end = start + int((doc == doc[start]).sum())
        d = tok[start:end]
        assert pos[start:end].tolist() == list(range(end - start))
        assert d[-1] == lay.eos_id and d[1] in lay.modality_token_ids
        # the modality token is never separated from its content
        for mt in lay.modality_token_ids:
            for j in (d == mt).nonzero().flatten().tolist():
                assert j + 1 < len(d) - 1 and d[j + 1] not in (lay.eos_id, *lay.modality_token_ids)
        assert tgt[start : end - 1].tolist() == d[1:].tolist() and tgt[end - 1] == IGNORE
        start = end
    assert start > 0
    assert (tgt[start:] == IGNORE).all()  # padding carries no loss


def test_commutative_order_is_seeded_and_fixed_order_is_fixed(
    two_sources: tuple[Path, Path],
) -> None:
    lay = LAYOUT
    b = SequenceBuilder(lay, SequenceConfig(order="random"), 256, seed=0)
    orders = Counter(
        b.plan(0, i, 0, np.array([3, 4]), h).blocks[0].modality for i, h in enumerate(range(200))
    )
    assert 60 < orders[0] < 140 and orders[0] + orders[1] == 200
    f = SequenceBuilder(lay, SequenceConfig(order="fixed", fixed_order=["b", "a"]), 256, seed=0)
    assert all(f.plan(0, 0, 0, np.array([3, 4]), h).blocks[0].modality == 1 for h in range(20))


def test_truncation_keeps_modality_tokens_with_content() -> None:
    lay = VocabLayout.build({"img": 16, "txt": 100}, fixed_lengths={"img": 20})
    b = SequenceBuilder(lay, SequenceConfig(order="fixed", max_tokens={"txt": 30}), 32, seed=0)
    p = b.plan(0, 0, 0, np.array([20, 50]), 0)
    assert p is not None
    # img (20) fits with its token (21 + bos/eos = 23); txt must be cut to the 9 left, not 30
    assert [(x.modality, x.n) for x in p.blocks] == [(0, 20), (1, 8)] and p.length == 32
    b2 = SequenceBuilder(lay, SequenceConfig(order="fixed", fixed_order=["txt", "img"]), 32, seed=0)
    p2 = b2.plan(0, 0, 0, np.array([20, 50]), 0)
    assert p2 is not None and [(x.modality, x.n) for x in p2.blocks] == [
        (1, 29)
    ]  # img dropped whole


# ---- exactly once over ranks and workers -------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_sample_once_per_epoch_pure(two_sources: tuple[Path, Path], world: int) -> None:
    """Ranks take disjoint slices of the global rows; together each epoch is a permutation."""
    cfg = cfg_for([two_sources[0]])
    stream = reference_stream(cfg)
    B = cfg.data.micro_batch_size
    per_rank: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    while stream.cursors[0].epoch < 2:
        rows = [stream.next_row() for _ in range(B * world)]
        for r in range(world):  # rank r's slice of this micro-batch group
            per_rank[r] += [(d.epoch, d.sample) for row in rows[r * B : (r + 1) * B] for d in row]
    placed = Counter(x for rank in per_rank for x in rank)
    assert all(n == 1 for n in placed.values())  # no (epoch, sample) twice, on any rank
    # epoch 0 complete. Since the chunked stream (loader state version 2), a document that
    # fits neither in its chunk nor in the next is dropped and counted (rare): it counts here
    dropped = Counter((d.epoch, d.sample) for d in stream.dropped_docs)
    assert not dropped & placed and len(dropped) <= 0.005 * len(placed)
    assert sorted(s for e, s in placed + dropped if e == 0) == list(range(600))


@pytest.mark.parametrize(("world", "workers"), [(1, 2), (2, 2), (3, 1), (4, 2)])
def test_every_sample_once_through_dataloader_workers(
    two_sources: tuple[Path, Path], world: int, workers: int
) -> None:
    cfg = cfg_for([two_sources[0]], **{"data.num_workers": workers})
    groups = 12
    docs_by_rank = []
    for r in range(world):
        loader, _ = build_loader(cfg, r, world)
        it = iter(loader)
        docs_by_rank.append([next(it)["docs"] for _ in range(groups)])
    # reference: the same stream computed in one process
    ref = reference_stream(cfg)
    B = cfg.data.micro_batch_size
    for g in range(groups):
        rows = [ref.next_row() for _ in range(B * world)]
        for r in range(world):
            expect = [d.sample for row in rows[r * B : (r + 1) * B] for d in row]
            assert docs_by_rank[r][g][:, 2].tolist() == expect, (g, r)
    pairs = np.concatenate([d for rank in docs_by_rank for d in rank])[:, 2:]
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)  # (sample, epoch) never repeats


def test_rows_do_not_depend_on_worker_count(two_sources: tuple[Path, Path]) -> None:
    got = []
    for workers in (0, 3):
        cfg = cfg_for([two_sources[0]], **{"data.num_workers": workers})
        loader, _ = build_loader(cfg, 1, 2)
        it = iter(loader)
        got.append([next(it)["tokens"] for _ in range(7)])
    for a, b in zip(*got):
        assert torch.equal(a, b)


# ---- mixing ------------------------------------------------------------------------------------
def realised(cfg: Any, min_tokens: int = 100_000) -> np.ndarray:
    stream = reference_stream(cfg)
    tokens = np.zeros(2)
    while tokens.sum() < min_tokens:
        for d in stream.next_row():
            tokens[d.source] += d.length
    return tokens / tokens.sum()


def test_token_weighted_mixing_within_2_percent(two_sources: tuple[Path, Path]) -> None:
    for w in ([0.5, 0.5], [0.2, 0.8], [0.9, 0.1]):
        r = realised(cfg_for(list(two_sources), w))
        assert np.abs(r - np.array(w)).max() <= 0.02, (w, r)


def test_sample_weighted_mixing_differs_with_unequal_lengths(
    two_sources: tuple[Path, Path],
) -> None:
    tok = realised(cfg_for(list(two_sources), [0.5, 0.5]))
    smp = realised(cfg_for(list(two_sources), [0.5, 0.5], **{"data.mix_by": "samples"}))
    assert abs(tok[0] - 0.5) <= 0.02
    assert smp[0] < 0.3  # short samples: half the samples is far less than half the tokens


def test_small_source_is_upsampled_by_epochs(two_sources: tuple[Path, Path]) -> None:
    stream = reference_stream(cfg_for(list(two_sources), [0.5, 0.5]))
    for _ in range(1000):
        stream.next_row()
    # the short source (fewer tokens) runs through more epochs for the same token share
    assert stream.cursors[0].epoch > stream.cursors[1].epoch >= 1


def test_packing_efficiency_and_no_split_documents(two_sources: tuple[Path, Path]) -> None:
    stream = reference_stream(cfg_for(list(two_sources)))
    rows = [stream.next_row() for _ in range(200)]
    used = [sum(d.length for d in row) for row in rows]
    assert max(used) <= 128
    assert np.mean(used) / 128 > 0.95


# ---- resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [1, 5, 13])
def test_resume_identity(two_sources: tuple[Path, Path], stop: int) -> None:
    cfg = cfg_for(list(two_sources), [0.3, 0.7], **{"data.num_workers": 2})
    loader, _ = build_loader(cfg, 1, 2)
    it = iter(loader)
    full = [next(it) for _ in range(stop + 6)]
    state = full[stop - 1]["state"]
    state = json.loads(json.dumps(state))  # as stored in a checkpoint
    resumed, _ = build_loader(cfg, 1, 2, state)
    it2 = iter(resumed)
    for b in full[stop:]:
        nb = next(it2)
        for k in ("tokens", "targets", "positions", "doc_ids", "target_direction"):
            assert torch.equal(b[k], nb[k]), k


@pytest.mark.parametrize(("old", "new"), [(2, 4), (4, 2)])
def test_elastic_resume_audit(two_sources: tuple[Path, Path], old: int, new: int) -> None:
    cfg = cfg_for(list(two_sources), [0.5, 0.5])
    reference = reference_stream(cfg)
    B = cfg.data.micro_batch_size
    stop_groups, after_groups = 3, 4
    consumed = []
    state = None
    for r in range(old):
        it = iter(build_loader(cfg, r, old)[0])
        for _ in range(stop_groups):
            b = next(it)
            consumed += [tuple(x) for x in b["docs"][:, 1:].tolist()]
        state = b["state"]
    for r in range(new):
        it = iter(build_loader(cfg, r, new, state)[0])
        for _ in range(after_groups):
            consumed += [tuple(x) for x in next(it)["docs"][:, 1:].tolist()]
    n_rows = B * (old * stop_groups + new * after_groups)
    expect = [(d.source, d.sample, d.epoch) for _ in range(n_rows) for d in reference.next_row()]
    assert sorted(consumed) == sorted(expect)  # nothing repeated, nothing skipped


# ---- layout and bad data -----------------------------------------------------------------------
def test_layout_mismatch_between_sources_is_refused(tmp_path: Path) -> None:
    write_dataset(samples(5), tmp_path / "x", LAYOUT)
    other = VocabLayout.build({"a": 50, "b": 71})
    s = samples(5)
    write_dataset(s, tmp_path / "y", other)
    cfg = cfg_for([tmp_path / "x", tmp_path / "y"])
    with pytest.raises(DataError, match="vocabulary layout of data.sources.0.*differs.*b"):
        open_sources(cfg.data, 0)


def _loader_batches(cfg: Any, n: int = 40) -> list[Any]:
    it = iter(build_loader(cfg, 0, 1)[0])
    return [next(it) for _ in range(n)]


def test_empty_and_missing_datasets(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no samples were written"):
        write_dataset([], tmp_path / "e", LAYOUT)
    cfg = cfg_for([tmp_path / "nope"])
    with pytest.raises(DataError, match="does not exist"):
        open_sources(cfg.data, 0)
    (tmp_path / "nomani").mkdir()
    with pytest.raises(DataError, match="manifest.json not found.*loretta-shards"):
        open_sources(cfg_for([tmp_path / "nomani"]).data, 0)


def test_missing_modality_policy(tmp_path: Path) -> None:
    write_dataset(samples(60, both=False), tmp_path / "half", LAYOUT, samples_per_shard=20)
    cfg = cfg_for([tmp_path / "half"])
    cfg.data.sources[0].modalities = ["a", "b"]
    with pytest.raises(
        DataError,
        match=r"shard-0000\d\d.tar sample 's\d+'.*missing modality \['b'\].*on_error=skip",
    ):
        _loader_batches(cfg, 2)
    cfg.data.on_error = "skip"
    stream = reference_stream(cfg)
    for _ in range(20):
        for d in stream.next_row():
            assert d.sample % 2 == 1  # only samples with both modalities
    assert stream.skipped["missing modality ['b']"] > 0
    assert stream.state_dict()["skipped"] == stream.skipped  # counts go into the checkpoint


def _corrupt_copy(src: Path, dst: Path, how: str) -> None:
    import shutil

    shutil.copytree(src, dst)
    shard = dst / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "npy":
        ds = ShardDataset(str(src))
        rec = ds.index[ds.shard_counts[0] + 3]  # a sample in shard 1
        off = int(rec["offset"][0]) - ds.shard_counts[0] * 0
        data[off : off + 6] = b"garbag"
        shard.write_bytes(bytes(data))
    elif how == "ids":
        ds = ShardDataset(str(src))
        rec = ds.index[ds.shard_counts[0] + 3]
        off = int(rec["offset"][0])
        hl = int.from_bytes(data[off + 8 : off + 10], "little")
        data[off + 10 + hl : off + 12 + hl] = (60000).to_bytes(2, "little")  # first id of 'a'
        shard.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("truncate", r"shard-000001.tar: .*bytes but the manifest says"),
        # both caught by the member's CRC32 in index.npy before the bytes are decoded
        ("npy", r"shard-000001.tar sample 's\d+' a.npy: bytes differ from their CRC32"),
        ("ids", r"shard-000001.tar sample 's\d+' a.npy: bytes differ from their CRC32"),
    ],
)
def test_corrupt_data_raises_or_skips(tmp_path: Path, how: str, error: str) -> None:
    src = tmp_path / "good"
    write_dataset(samples(40), src, LAYOUT, samples_per_shard=10)
    bad = tmp_path / "bad"
    _corrupt_copy(src, bad, how)
    cfg = cfg_for([bad])
    with pytest.raises(DataError, match=error):
        _loader_batches(cfg, 12)
    if how == "truncate":
        return  # the manifest check refuses the dataset whatever the policy
    cfg.data.on_error = "skip"
    batches = _loader_batches(cfg, 12)
    assert batches[-1]["read_errors"] >= 1
    assert all(b["tokens"].shape == (8, 128) for b in batches)


def test_manifest_disagreeing_with_index(tmp_path: Path) -> None:
    write_dataset(samples(20), tmp_path / "d", LAYOUT, samples_per_shard=10)
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    man["shards"][0]["samples"] = 11
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="manifest lists 21 samples.*disagrees"):
        ShardDataset(str(tmp_path / "d"))
