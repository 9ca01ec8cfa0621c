"""MDS (mosaicml-streaming) datasets: lossless round trip, the same batches as the webdataset
source, exactly-once coverage and resume, remote reads, corrupt data, and a 2-rank torchrun."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import base_env, losses, reference_stream, tiny_overrides, torchrun

from loretta.config import SourceConfig, load_config
from loretta.data.loader import ROW_FIELDS, build_loader
from loretta.data.mds import MDS_INDEX, MdsDataset
from loretta.data.mds_convert import from_mds, to_mds
from loretta.data.shards import ShardDataset, write_dataset
from loretta.data.sources import open_dataset
from loretta.errors import DataError
from loretta.vocab import VocabLayout

# streaming keeps file locks in the temp dir: a private one (conftest.private_tmpdir)
pytestmark = pytest.mark.usefixtures("private_tmpdir")

# 'big' needs int32 ids (more than 65,536): both column dtypes are exercised
LAYOUT = VocabLayout.build({"a": 50, "b": 70, "big": 70_000})


def samples(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Samples with every combination of present/absent modalities, and metadata."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s: dict[str, Any] = {"key": f"s{i:05d}", "meta": {"i": i, "tag": ["x", "y"][i % 2]}}
        if i % 3 != 1:
            s["a"] = rng.integers(0, 50, int(rng.integers(3, 30)))
        if i % 3 != 2:
            s["b"] = rng.integers(0, 70, int(rng.integers(3, 30)))
        if i % 4 == 0:
            s["big"] = rng.integers(0, 70_000, int(rng.integers(1, 9)))
        out.append(s)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same 300 samples as webdataset tars and as MDS."""
    root = tmp_path_factory.mktemp("mds")
    wds, mds = root / "wds", root / "mds"
    write_dataset(samples(300), wds, LAYOUT, samples_per_shard=64)
    to_mds(wds, mds)
    return wds, mds


def cfg_for(path: str | Path, **over: Any) -> Any:
    cfg = load_config("tiny", [f"--{k}={v}" for k, v in over.items()])
    cfg.data.sources = [SourceConfig(name="s0", path=str(path), weight=1.0)]
    return cfg


def batches(cfg: Any, rank: int, world: int, n: int, state: Any = None) -> list[dict[str, Any]]:
    it = iter(build_loader(cfg, rank, world, state)[0])
    return [next(it) for _ in range(n)]


def assert_same_batches(xs: list[dict[str, Any]], ys: list[dict[str, Any]]) -> None:
    assert len(xs) == len(ys)
    for g, (x, y) in enumerate(zip(xs, ys)):
        for k in ROW_FIELDS:
            assert torch.equal(x[k], y[k]), (g, k)
        assert np.array_equal(x["docs"], y["docs"]), g


# ---- conversion --------------------------------------------------------------------------------
def test_round_trip_is_lossless(pair: tuple[Path, Path], tmp_path: Path) -> None:
    wds, mds = pair
    names = sorted(os.listdir(mds))
    assert names[:3] == ["index.json", MDS_INDEX, "manifest.json"]
    assert names[3:] == [f"shard.{i:05d}.mds" for i in range(5)]  # one MDS shard per tar
    man = json.loads((mds / "manifest.json").read_text())
    assert man["format"] == "loretta-mds" and man["index"]["file"] == MDS_INDEX
    assert [s["samples"] for s in man["shards"]] == [64, 64, 64, 64, 44]
    assert VocabLayout.from_dict(man["layout"]) == LAYOUT

    back = tmp_path / "back"
    from_mds(mds, back)
    src, dst = ShardDataset(str(wds)), ShardDataset(str(back))
    # bit-identical tars: same keys, arrays (and dtypes), metadata and shard boundaries
    assert [s.sha256 for s in src.manifest.shards] == [s.sha256 for s in dst.manifest.shards]
    assert dst.manifest.meta == src.manifest.meta
    ds = MdsDataset(str(mds))
    for i in range(len(src)):
        want, got = src.read(i), ds.read(i)
        assert want.keys() == got.keys() and src.key(i) == ds.key(i)
        for k in want:
            assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k])
        assert src.meta(i) == ds.meta(i)
    assert np.array_equal(ds.lengths, src.lengths) and ds.shard_counts == src.shard_counts


def test_plain_streaming_reads_the_columns(pair: tuple[Path, Path]) -> None:
    """Anyone with mosaicml-streaming can read our MDS: absent = lengths 0 + placeholder."""
    from streaming import StreamingDataset

    sd = StreamingDataset(local=str(pair[1]), shuffle=False, predownload=8)
    s = sd[1]  # sample 1 has no 'a' and no 'big'
    assert s["key"] == "s00001" and s["meta"] == {"i": 1, "tag": "y"}
    assert s["lengths"].tolist() == [0, len(s["b"]), 0] and s["a"].size == 1
    assert s["big"].dtype == np.int32 and s["b"].dtype == np.uint16


def test_parallel_compressed_conversion(pair: tuple[Path, Path], tmp_path: Path) -> None:
    m = to_mds(pair[0], tmp_path / "z", workers=2, compression="zstd")
    assert [s.name for s in m.shards] == [f"shard.{i:05d}.mds.zstd" for i in range(5)]
    ds, ref = MdsDataset(str(tmp_path / "z")), MdsDataset(str(pair[1]))
    for i in (0, 100, 299):
        assert ds.meta(i) == ref.meta(i)
        assert all(np.array_equal(v, ref.read(i)[k]) for k, v in ds.read(i).items())
    with pytest.raises(DataError, match=r"compression='lz9': streaming compresses with \['br'"):
        to_mds(pair[0], tmp_path / "y", compression="lz9")


def test_regrouped_shards_and_refusals(pair: tuple[Path, Path], tmp_path: Path) -> None:
    m = to_mds(pair[0], tmp_path / "m", samples_per_shard=100)
    assert [s.samples for s in m.shards] == [100, 100, 100]
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        to_mds(pair[0], tmp_path / "m")
    to_mds(pair[0], tmp_path / "m", overwrite=True)
    assert MdsDataset(str(tmp_path / "m")).shard_counts == [64, 64, 64, 64, 44]
    clash = tmp_path / "clash"
    write_dataset([{"key": "k", "lengths": [1, 2]}], clash, VocabLayout.build({"lengths": 5}))
    with pytest.raises(DataError, match="'lengths' clashes with an MDS column"):
        to_mds(clash, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


# ---- the loader over MDS -----------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_equal_webdataset(pair: tuple[Path, Path], workers: int) -> None:
    wds, mds = pair
    over = {"data.num_workers": workers}
    assert isinstance(open_dataset(str(mds)), MdsDataset)
    for rank in (0, 1):
        assert_same_batches(
            batches(cfg_for(wds, **over), rank, 2, 12), batches(cfg_for(mds, **over), rank, 2, 12)
        )


def test_every_sample_once_over_mds(pair: tuple[Path, Path]) -> None:
    """2 ranks x 2 workers over MDS: the rows are the reference stream's, nothing repeats."""
    cfg = cfg_for(pair[1], **{"data.num_workers": 2})
    B, world, groups = cfg.data.micro_batch_size, 2, 16
    got = [batches(cfg, r, world, groups) for r in range(world)]
    ref = reference_stream(cfg)
    consumed: Counter[tuple[int, int]] = Counter()
    for g in range(groups):
        rows = [ref.next_row() for _ in range(B * world)]
        for r in range(world):
            expect = [x.sample for row in rows[r * B : (r + 1) * B] for x in row]
            assert got[r][g]["docs"][:, 2].tolist() == expect, (g, r)
            consumed.update((int(s), int(e)) for s, e in got[r][g]["docs"][:, 2:])
    assert max(consumed.values()) == 1
    assert ref.cursors[0].epoch >= 1  # a whole epoch was covered: every sample exactly once
    assert {s for s, e in consumed if e == 0} == set(range(300))


@pytest.mark.parametrize("stop", [2, 7])
def test_resume_identity_over_mds(pair: tuple[Path, Path], stop: int) -> None:
    cfg = cfg_for(pair[1], **{"data.num_workers": 2})
    full = batches(cfg, 1, 2, stop + 5)
    state = json.loads(json.dumps(full[stop - 1]["state"]))  # as stored in a checkpoint
    assert_same_batches(full[stop:], batches(cfg, 1, 2, 5, state))


# ---- remote (object-store style) reads ---------------------------------------------------------
def test_remote_mds_through_a_local_cache(pair: tuple[Path, Path], tmp_path: Path) -> None:
    wds, mds = pair
    url = f"file://{mds}"
    cache = tmp_path / "cache"
    ds = open_dataset(url, cache)
    assert isinstance(ds, MdsDataset) and ds.remote == str(mds)
    local = MdsDataset(str(mds))
    assert not list(ds.local.glob("*.mds"))  # shards are fetched on first use, not at open
    i = local.shard_counts[0] + 5  # a sample in shard 1
    assert ds.key(i) == local.key(i) and ds.meta(i) == local.meta(i)
    assert all(np.array_equal(v, local.read(i)[k]) for k, v in ds.read(i).items())
    assert sorted(p.name for p in ds.local.glob("*.mds")) == ["shard.00001.mds"]
    over = {"data.num_workers": 2, "data.cache_dir": str(cache)}
    cfg = cfg_for(url, **over)
    assert_same_batches(batches(cfg_for(wds, **over), 0, 1, 8), batches(cfg, 0, 1, 8))
    with pytest.raises(DataError, match="cannot read 'http' URLs"):
        MdsDataset("http://127.0.0.1:9/mds", cache)


# ---- processes ---------------------------------------------------------------------------------
@pytest.mark.timeout(120)  # a regression would wait for a rank-0 rendezvous that never comes
def test_no_streaming_before_the_process_group(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a 2-rank launcher with no process group (loretta's config checks), opening must not
    construct a StreamingDataset: streaming would create a process group of its own and wait
    for the other rank. A read then builds a private one-process reader."""
    for k, v in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "9")  # nobody listens: a rendezvous would fail, not pass
    copy = pair[1].parent / "mds-copy"  # a folder no StreamingDataset in this process has used
    if not copy.exists():
        shutil.copytree(pair[1], copy)
    ds = MdsDataset(str(copy))
    assert ds._sd is None and len(ds) == 300 and ds.lengths.shape == (300, 3)
    assert ds.key(6) == "s00006" and "a" in ds.read(6)
    assert ds._sd is not None and os.environ["WORLD_SIZE"] == "2"  # env restored


# ---- bad data ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # streaming decoding garbage offsets
def test_corrupt_mds_is_named(pair: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(pair[1], bad)
    shard = bad / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DataError, match=r"shard.00001.mds: \d+ bytes but the manifest says"):
        MdsDataset(str(bad))
    # same size, garbage inside: the read names the shard and the sample
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    shard.write_bytes(bytes(data))
    ds = MdsDataset(str(bad))
    errors = []
    for i in range(ds.shard_counts[0], ds.shard_counts[0] * 2):
        try:
            ds.read(i)
        except DataError as e:
            errors.append(str(e))
    assert errors and all("bad/shard.00001.mds sample 's00" in e for e in errors)
    with pytest.raises(DataError, match=r"shard.00001.mds: sha256 \w+\.\.\. differs"):
        MdsDataset(str(bad), verify_checksums=True).read(ds.shard_counts[0])
    man = json.loads((bad / "manifest.json").read_text())
    man["shards"][0]["samples"] = 63
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="index.*disagrees|manifest lists 299"):
        MdsDataset(str(bad))


# ---- training under torchrun -------------------------------------------------------------------
def test_torchrun_two_ranks_train_on_mds(tmp_path: Path, tiny_data: Path) -> None:
    """2 ranks x 1 DataLoader worker each read MDS through streaming; the documents consumed
    are exactly the reference stream's over the webdataset source."""
    mds = tmp_path / "mds"
    to_mds(tiny_data, mds)
    steps = 3
    env = base_env(TMPDIR=str(tmp_path))
    over = {"optim.warmup_steps": 1, "data.num_workers": 1, "data.audit": "true"}
    torchrun(2, ["--config", "tiny", *tiny_overrides(tmp_path, steps=steps, data=mds, **over)], env)
    run = tmp_path / "run"
    loss = losses(run)
    assert sorted(loss) == [1, 2, 3] and all(np.isfinite(v) for v in loss.values())
    consumed = Counter()
    for r in range(2):
        for line in (run / "audit" / f"rank{r:05d}.jsonl").read_text().splitlines():
            consumed.update(tuple(d) for d in json.loads(line)["docs"])
    cfg = load_config("tiny", [f"--data.sources.0.path={tiny_data}"])
    ref = reference_stream(cfg)
    rows = steps * cfg.optim.grad_accum_steps * cfg.data.micro_batch_size * 2
    expect = Counter((x.source, x.sample, x.epoch) for _ in range(rows) for x in ref.next_row())
    assert consumed == expect
