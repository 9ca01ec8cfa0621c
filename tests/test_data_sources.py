"""Ways into loretta's data: one size convention (loretta/units.py), remote fetches without a
shell (loretta/data/remote.py), shard names from outside checked, compressed tars and plain
MDSWriter folders indexed by `loretta-shards index`, and `open_dataset` over every kind."""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import PY

from loretta.config import SourceConfig, load_config
from loretta.data.format import npy_bytes, read_manifest
from loretta.data.loader import ROW_FIELDS, build_loader
from loretta.data.mds import MdsDataset
from loretta.data.remote import FetchOptions, cache_path, download, fetch, join_url
from loretta.data.shards import ShardDataset, write_dataset
from loretta.data.sources import open_dataset
from loretta.data.tools import main
from loretta.errors import DataError
from loretta.units import parse_size
from loretta.vocab import VocabLayout

pytestmark = pytest.mark.usefixtures("private_tmpdir")  # streaming's file locks

LAYOUT = VocabLayout.build({"image": 256, "text": 1000}, fixed_lengths={"image": 16})
Cli = Callable[..., tuple[int, str, str]]
ONCE = FetchOptions(retries=1, timeout_s=2)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*args: Any) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def layout_file(tmp_path: Path) -> Path:
    p = tmp_path / "layout.json"
    p.write_text(json.dumps(LAYOUT.to_dict()))
    return p


def samples(n: int = 24) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    return [
        {
            "key": f"k{i:03d}",
            "image": rng.integers(0, 256, 16).astype(np.uint16),
            "text": rng.integers(0, 1000, int(rng.integers(2, 30))).astype(np.uint16),
            "meta": {"i": i},
        }
        for i in range(n)
    ]


def assert_reads(ds: Any, want: list[dict[str, Any]], keys: bool = True) -> None:
    assert len(ds) == len(want)
    for i, s in enumerate(want):
        got = ds.read(i)
        assert sorted(got) == ["image", "text"]
        assert all(np.array_equal(got[m], s[m]) for m in got), i
        assert ds.meta(i) == s["meta"]
        if keys:
            assert ds.key(i) == s["key"]


def loader_batches(path: Path, n: int = 3) -> list[dict[str, Any]]:
    cfg = load_config("tiny", ["--data.num_workers=0"])
    cfg.data.sources = [SourceConfig(name="s", path=str(path))]
    it = iter(build_loader(cfg, 0, 1)[0])
    return [next(it) for _ in range(n)]


def assert_same_batches(xs: list[dict[str, Any]], ys: list[dict[str, Any]]) -> None:
    for x, y in zip(xs, ys, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ROW_FIELDS)


# ---- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("123", 123),
        ("123B", 123),
        ("64KB", 64_000),
        ("64KiB", 65_536),
        ("64MB", 64_000_000),
        ("64mib", 64 << 20),
        ("2GB", 2_000_000_000),
        ("2GiB", 2 << 30),
        ("1.5GB", 1_500_000_000),
        ("1TB", 10**12),
        ("64M", 64_000_000),
    ],
)
def test_one_size_convention(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "-1MB", "0", "64 XB", "64iB", "1e3"])
def test_bad_sizes_name_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match=r"--shard-size=.*(64MiB|at least 1 byte)"):
        parse_size(text, "--shard-size")


def test_shard_size_flag_is_decimal(tmp_path: Path, cli: Cli, layout_file: Path) -> None:
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("".join(json.dumps(_line(s)) + "\n" for s in samples(8)))
    rc, _, err = cli("write", jsonl, tmp_path / "o", "--layout", layout_file, "--shard-size", "1x")
    assert rc == 2 and "--shard-size='1x'" in err and "64MiB" in err


def _line(s: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in s.items()}


# ---- names from outside, remote fetches --------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../x.tar", "sub/x.tar", "/etc/passwd", "x.tar; rm -rf ~", "$(id).tar", "a..tar", ""]
)
def test_manifest_shard_names_must_be_plain(tmp_path: Path, name: str) -> None:
    write_dataset(samples(4), tmp_path / "ds", LAYOUT, samples_per_shard=4)
    mpath = tmp_path / "ds" / "manifest.json"
    d = json.loads(mpath.read_text())
    d["shards"][0]["name"] = name
    mpath.write_text(json.dumps(d))
    with pytest.raises(DataError) as e:
        ShardDataset(str(tmp_path / "ds"))
    msg = str(e.value)
    assert str(mpath) in msg and repr(name) in msg and "rename the file" in msg
    with pytest.raises(DataError, match="not a plain file name"):
        cache_path(tmp_path, name)
    with pytest.raises(DataError, match="not a plain file name"):
        join_url("pipe:cat /data/{}", name)


def test_pipe_runs_one_program_without_a_shell(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"payload")
    got = fetch(f"pipe:cat {tmp_path / 'src'}/{{}}", "a.bin", tmp_path / "cache")
    assert got.read_bytes() == b"payload"
    marker = tmp_path / "pwned"
    with pytest.raises(DataError, match="could not fetch"):  # ';' is an argument, not a shell
        fetch(f"pipe:cat {tmp_path}/src/{{}}; touch {marker}", "a.bin", tmp_path / "c2", opts=ONCE)
    assert not marker.exists() and not (tmp_path / "c2" / "a.bin").exists()
    with pytest.raises(DataError, match="where the file name goes"):
        join_url("pipe:cat /data/x", "a.bin")


def test_a_failed_download_leaves_nothing_behind(tmp_path: Path) -> None:
    """A command that writes part of a file, then fails: no file and no temp file in the cache,
    after every retry; the error names the URL and the attempts."""
    script = "import sys; sys.stdout.write('partial'); sys.stdout.flush(); sys.exit(3)"
    url = f"pipe:{shlex.quote(PY)} -c {shlex.quote(script)} {{}}"
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"\(2 attempts\).*exited with 3"):
        fetch(url, "shard-000000.tar", cache, opts=FetchOptions(retries=2, backoff_s=0.01))
    assert list(cache.iterdir()) == []
    with pytest.raises(DataError, match="HTTP 404|could not fetch"):
        download("http://127.0.0.1:9/none", tmp_path / "x", opts=ONCE)
    assert not (tmp_path / "x").exists()


# ---- compressed tars ---------------------------------------------------------------------------
def write_tar_gz(path: Path, items: list[dict[str, Any]]) -> None:
    """A webdataset tar compressed with gzip, as other tools write them."""
    with tarfile.open(path, "w:gz") as tf:
        for s in items:
            members = {f"{s['key']}.{m}.npy": npy_bytes(s[m]) for m in ("image", "text")}
            members[f"{s['key']}.json"] = json.dumps(s["meta"]).encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_index_compressed_tars_then_train(tmp_path: Path, cli: Cli, layout_file: Path) -> None:
    want = samples(24)
    folder = tmp_path / "gz"
    folder.mkdir()
    write_tar_gz(folder / "part-0.tar.gz", want[:12])
    write_tar_gz(folder / "part-1.tgz", want[12:])
    rc, out, err = cli("index", folder, "--layout", layout_file)
    assert rc == 0 and "2 compressed tars decompressed" in out, err
    m = read_manifest(folder / "manifest.json")
    assert [s.name for s in m.shards] == ["part-0.tar", "part-1.tar"]
    assert m.meta["decompressed"] == {"part-0.tar": "part-0.tar.gz", "part-1.tar": "part-1.tgz"}
    assert sorted(p.name for p in folder.iterdir()) == [
        "index.npy", "manifest.json", "part-0.tar", "part-0.tar.gz", "part-1.tar", "part-1.tgz",
    ]  # fmt: skip
    ds = open_dataset(folder)
    assert isinstance(ds, ShardDataset)
    assert_reads(ds, want)
    ref = tmp_path / "ref"
    write_dataset(want, ref, LAYOUT, samples_per_shard=12)
    assert ShardDataset(str(ref)).shard_counts == ds.shard_counts == [12, 12]
    assert_same_batches(loader_batches(folder), loader_batches(ref))
    mtime = (folder / "part-0.tar").stat().st_mtime_ns
    rc, _, err = cli("index", folder)  # re-index: the plain tars are reused
    assert rc == 0 and (folder / "part-0.tar").stat().st_mtime_ns == mtime, err
    rc, out, err = cli("verify", folder)
    assert rc == 0 and "OK" in out, err
    rc, out, _ = cli("inspect", folder / "part-1.tgz", "-n", 1)
    assert rc == 0 and "12 samples" in out and "'k012'" in out


def test_a_broken_tar_gz_is_named(tmp_path: Path, cli: Cli, layout_file: Path) -> None:
    folder = tmp_path / "gz"
    folder.mkdir()
    write_tar_gz(folder / "a.tar.gz", samples(4))
    data = (folder / "a.tar.gz").read_bytes()
    (folder / "a.tar.gz").write_bytes(data[: len(data) // 2])
    rc, _, err = cli("index", folder, "--layout", layout_file)
    assert rc == 2 and "a.tar.gz: cannot decompress" in err and "re-download" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a.tar.gz"]  # no partial tar left


# ---- plain MDSWriter folders -------------------------------------------------------------------
def write_plain_mds(folder: Path, items: list[dict[str, Any]], key: bool, **extra: str) -> None:
    from streaming import MDSWriter

    columns = {"image": "ndarray:uint16", "text": "ndarray", "meta": "json", **extra}
    if key:
        columns["key"] = "str"
    with MDSWriter(out=str(folder), columns=columns, size_limit=1 << 10) as w:
        for s in items:
            rec = {"image": s["image"], "text": s["text"].astype(np.int32), "meta": s["meta"]}
            if key:
                rec["key"] = s["key"]
            rec.update({k: "x" for k in extra})
            w.write(rec)


@pytest.mark.parametrize("key", [True, False])
def test_adopt_plain_mds_then_train(tmp_path: Path, cli: Cli, layout_file: Path, key: bool) -> None:
    want = samples(24)
    folder = tmp_path / "plain"
    write_plain_mds(folder, want, key)
    shards = json.loads((folder / "index.json").read_text())["shards"]
    assert len(shards) > 1  # several MDS shards
    # before adoption: the message says which command works, and that command does
    with pytest.raises(DataError) as e:
        open_dataset(folder)
    hint = re.search(r"`(loretta-shards index [^`]*)`", str(e.value))
    assert hint and "MDSWriter" in str(e.value), e.value
    args = shlex.split(hint.group(1))[1:]
    rc, out, err = cli(*[str(layout_file) if a == "layout.json" else a for a in args])
    assert rc == 0 and "adopted MDS folder" in out, err
    m = read_manifest(folder / "manifest.json")
    assert m.format == "loretta-mds" and len(m.shards) == len(shards)
    assert m.tokens["image"] == 16 * 24
    ds = open_dataset(folder)
    assert isinstance(ds, MdsDataset)
    assert_reads(ds, want, keys=key)
    assert ds.key(3) == ("k003" if key else "000000000003")
    rc, out, err = cli("verify", folder)
    assert rc == 0 and "OK" in out, err
    batches = loader_batches(folder)
    assert all(int((b["targets"] != -100).sum()) > 0 for b in batches)
    back = tmp_path / "back"
    rc, _, err = cli("from-mds", folder, back, "--quiet")
    assert rc == 0, err
    assert_reads(ShardDataset(str(back)), want, keys=key)


def test_adopting_refuses_unknown_columns(tmp_path: Path, cli: Cli, layout_file: Path) -> None:
    folder = tmp_path / "plain"
    write_plain_mds(folder, samples(4), key=True, caption="str")
    rc, _, err = cli("index", folder, "--layout", layout_file)
    assert rc == 2 and "column 'caption' (str)" in err and "add 'caption' to the layout" in err
    assert not (folder / "manifest.json").exists()


def test_adopting_checks_every_id(tmp_path: Path, cli: Cli, layout_file: Path) -> None:
    bad = samples(6)
    bad[4]["text"] = np.array([1, 5000])  # the text modality has 1000 ids
    folder = tmp_path / "plain"
    write_plain_mds(folder, bad, key=True)
    rc, _, err = cli("index", folder, "--layout", layout_file)
    assert rc == 2 and "sample 4 ('k004') text" in err and "[1, 5000]" in err


def test_open_dataset_hints_for_tars_without_a_manifest(tmp_path: Path) -> None:
    write_dataset(samples(4), tmp_path / "ds", LAYOUT, samples_per_shard=4)
    (tmp_path / "ds" / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"loretta-shards index .*ds --layout layout.json"):
        open_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")


def test_file_urls_read_like_folders(tmp_path: Path) -> None:
    write_dataset(samples(10), tmp_path / "ds", LAYOUT, samples_per_shard=4)
    ds = open_dataset(f"file://{tmp_path / 'ds'}", tmp_path / "cache")
    assert isinstance(ds, ShardDataset) and ds.remote
    assert_reads(ds, samples(10))
    assert sorted(p.name for p in ds.local.iterdir())[-1] == "shard-000002.tar"
    with pytest.raises(DataError, match=r"could not fetch file://.*not found"):
        fetch(f"file://{tmp_path / 'ds'}", "shard-000009.tar", tmp_path / "c2")
