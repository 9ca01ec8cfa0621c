"""`loretta-shards` (loretta/data/tools.py) on real files: every subcommand, bad inputs (exit 2,
a message naming file, field and value, no traceback), and datasets read through remote URLs
(pipe: and http://)."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shlex
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import PY, REPO, base_env

from loretta.config import SourceConfig, load_config
from loretta.data.format import sha256_file
from loretta.data.loader import ROW_FIELDS, build_loader
from loretta.data.shards import ShardDataset, write_dataset
from loretta.data.tools import main
from loretta.units import parse_size
from loretta.vocab import VocabLayout

# streaming keeps file locks in the temp dir: a private one (conftest.private_tmpdir)
pytestmark = pytest.mark.usefixtures("private_tmpdir")

LAYOUT = VocabLayout.build({"image": 256, "text": 1000}, fixed_lengths={"image": 16})
Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `loretta-shards ARGS` in this process: (exit code, stdout, stderr)."""

    def run(*args: Any) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def samples(n: int = 30) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        s: dict[str, Any] = {"key": f"k{i:03d}", "meta": {"i": i}}
        if i % 5 != 4:
            s["image"] = rng.integers(0, 256, 16)
        s["text"] = rng.integers(0, 1000, int(rng.integers(3, 40)))
        out.append(s)
    return out


def write_inputs(root: Path, items: list[dict[str, Any]]) -> dict[str, Path]:
    """The same samples as a folder of .npz, a folder of .npy and a JSON-lines file."""
    npz, npy, jsonl = root / "npz", root / "npy", root / "s.jsonl"
    npz.mkdir()
    npy.mkdir()
    with open(jsonl, "w") as f:
        for s in items:
            arrays = {k: v for k, v in s.items() if k not in ("key", "meta")}
            np.savez(npz / f"{s['key']}.npz", **arrays)
            for k, v in arrays.items():
                np.save(npy / f"{s['key']}.{k}.npy", v)
            for folder in (npz, npy):
                (folder / f"{s['key']}.json").write_text(json.dumps(s["meta"]))
            line = {"key": s["key"], **{k: v.tolist() for k, v in arrays.items()}}
            f.write(json.dumps({**line, "meta": s["meta"]}) + "\n")
    return {"npz": npz, "npy": npy, "jsonl": jsonl}


@pytest.fixture
def layout_file(tmp_path: Path, cli: Cli) -> Path:
    path = tmp_path / "layout.json"
    rc, out, _ = cli(
        "layout", path, "--modality", "image=256", "--modality", "text=1000", "--fixed", "image=16"
    )
    assert rc == 0 and "<image>=3, ids [5, 261)" in out
    return path


# ---- layout ------------------------------------------------------------------------------------
def test_layout_file(layout_file: Path) -> None:
    assert VocabLayout.from_dict(json.loads(layout_file.read_text())) == LAYOUT


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modality", "image"], "--modality 'image': expected NAME=SIZE, e.g. image=256"),
        (["--modality", "a=3", "--modality", "a=4"], "modality 'a' is given twice"),
        (["--modality", "a=3", "--fixed", "b=2"], "'b' is not one of the --modality names"),
        (["--modality", "a=0"], "modality 'a' size 0 must be >= 1"),
        ([], "give at least one --modality NAME=SIZE"),
    ],
)
def test_layout_bad_input(tmp_path: Path, cli: Cli, args: list[str], message: str) -> None:
    rc, _, err = cli("layout", tmp_path / "l.json", *args)
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "l.json").exists()


def test_layout_refuses_to_overwrite(layout_file: Path, cli: Cli) -> None:
    rc, _, err = cli("layout", layout_file, "--modality", "a=3")
    assert rc == 2 and "already exists; choose another file or pass --overwrite" in err


# ---- write -------------------------------------------------------------------------------------
def test_write_every_input_format_gives_the_same_shards(
    tmp_path: Path, cli: Cli, layout_file: Path
) -> None:
    items = samples()
    inputs = write_inputs(tmp_path, items)
    digests = []
    for kind, path in inputs.items():
        out = tmp_path / f"out-{kind}"
        rc, text, err = cli("write", path, out, "--layout", layout_file, "--samples-per-shard", 7)
        assert rc == 0, err
        assert "5 shards, 30 samples" in text
        ds = ShardDataset(str(out))
        digests.append([s.sha256 for s in ds.manifest.shards])
        for i, s in enumerate(items):
            got = ds.read(i)
            assert ds.key(i) == s["key"] and ds.meta(i) == s["meta"]
            assert got.keys() == {k for k in s if k not in ("key", "meta")}
            assert all(np.array_equal(got[k], s[k]) for k in got)
    assert digests[0] == digests[1] == digests[2]  # the format of the input leaves no trace


def test_write_shard_size_and_workers(tmp_path: Path, cli: Cli, layout_file: Path) -> None:
    assert parse_size("64MB") == 64_000_000 and parse_size("64MiB") == 64 << 20  # units.py
    assert parse_size("1.5KiB") == 1536 and parse_size("1.5kb") == 1500
    jsonl = write_inputs(tmp_path, samples(60))["jsonl"]
    rc, _, err = cli(
        "write", jsonl, tmp_path / "a", "--layout", layout_file, "--shard-size", "40KB"
    )
    assert rc == 0 and "samples per shard" in err and "60/60" in err  # estimate, progress bar
    a = ShardDataset(str(tmp_path / "a")).manifest
    assert len(a.shards) > 2 and all(s.bytes <= 2 * 40_000 for s in a.shards)
    rc, _, err = cli(
        "write", jsonl, tmp_path / "b", "--layout", layout_file, "--shard-size", "40KB",
        "--workers", 2, "--quiet",
    )  # fmt: skip
    assert rc == 0, err
    b = ShardDataset(str(tmp_path / "b")).manifest
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # parallel == sequential


def _bad_jsonl(line: str) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        good = json.dumps({"key": "k0", "image": list(range(16)), "text": [1, 2]})
        (root / "s.jsonl").write_text(f"{good}\n{line}\n")
        return root / "s.jsonl"

    return make


def _npz_folder(files: dict[str, Any]) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        folder = root / "in"
        folder.mkdir()
        for name, content in files.items():
            if isinstance(content, bytes):
                (folder / name).write_bytes(content)
            elif name.endswith(".npy"):
                np.save(folder / name, content)
            else:
                np.savez(folder / name, **content)
        return folder

    return make


IMG = np.zeros(16, dtype=np.int64)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_bad_jsonl('{"key": "k1", "text": [1, 4000]}'), r"s.jsonl:2: text: ids span \[1, 4000\] but the modality has 1000 ids .*re-tokenise or enlarge the layout"),
        (_bad_jsonl('{"key": "k1", "audio": [1]}'), r"s.jsonl:2: 'audio' is not a modality of the layout \['image', 'text'\].*--modality audio=SIZE"),
        (_bad_jsonl('{"key": "k1", "text": [1, 2'), r"s.jsonl:2: not valid JSON"),
        (_bad_jsonl('{"text": [1, 2]}'), r's.jsonl:2: "key" is None; every line needs a string "key" field'),
        (_bad_jsonl('{"key": "k1", "text": [1.5, 2]}'), r"s.jsonl:2: text: token array has dtype float64; expected integers"),
        (_bad_jsonl('{"key": "k0", "text": [1]}'), r"s.jsonl:2: sample key 'k0' appears twice"),
        (_bad_jsonl('{"key": "k.1", "text": [1]}'), r"s.jsonl:2: sample key 'k.1' must be 1..64 bytes without '.'"),
        (_bad_jsonl('{"key": "k1", "meta": [1]}'), r's.jsonl:2: "meta" must be a JSON object'),
        (_bad_jsonl('{"key": "k1", "image": [1, 2]}'), r"s.jsonl:2: image has 2 tokens but the layout fixes image at 16"),
        (_npz_folder({"k0.npz": {"image": IMG}, "k1.npz": b"not a zip"}), r"in/k1.npz: unreadable .npz"),
        (_npz_folder({"k0.npz": {"image": IMG, "text": np.zeros((2, 3), int)}}), r"in/k0.npz: text: token array has shape \(2, 3\); expected 1-D ids"),
        (_npz_folder({"k0.image.npy": IMG, "k0.audio.npy": IMG}), r"in/k0.audio.npy: 'audio' is not a modality"),
        (_npz_folder({"k0.npz": {"image": IMG}, "k0.json": b"[1]"}), r"in/k0.json: metadata must be a JSON object"),
        (_npz_folder({"k0.npz": {"image": IMG}, "k1.image.npy": IMG}), r"in: holds \['npz', 'npy'\] files; choose one with --format"),
        (_npz_folder({"notes.txt": b"hello"}), r"in: no .npz, .npy or .jsonl files found"),
    ],
)  # fmt: skip
def test_write_bad_input(
    tmp_path: Path, cli: Cli, layout_file: Path, make: Callable[[Path], Path], message: str
) -> None:
    src = make(tmp_path)
    rc, _, err = cli("write", src, tmp_path / "out", "--layout", layout_file, "--quiet")
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith("loretta-shards write: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder


def test_write_bad_layout_file(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "l.json").write_text('{"modalities": [{"name": "a"}]}')
    jsonl = _bad_jsonl("")(tmp_path)
    rc, _, err = cli("write", jsonl, tmp_path / "o", "--layout", tmp_path / "nope.json")
    assert rc == 2 and "nope.json: file not found; create it with `loretta-shards layout" in err
    rc, _, err = cli("write", jsonl, tmp_path / "o", "--layout", tmp_path / "l.json")
    assert rc == 2 and "l.json: malformed vocabulary layout (KeyError: 'size')" in err


# ---- index, inspect, verify --------------------------------------------------------------------
def _foreign_tars(folder: Path, bad_id: bool = False) -> None:
    """Tars written by plain webdataset (no manifest), as another pipeline would."""
    import webdataset as wds

    folder.mkdir()
    for t in range(2):
        with wds.TarWriter(str(folder / f"part-{t}.tar")) as tw:
            for i in range(5):
                text = np.arange(3 + i, dtype=np.int64) + (999 if bad_id and t == 1 else 0)
                tw.write({"__key__": f"t{t}x{i}", "text.npy": text, "json": {"t": t}})


def test_index_existing_tars(tmp_path: Path, cli: Cli, layout_file: Path) -> None:
    _foreign_tars(tmp_path / "tars")
    rc, out, err = cli("index", tmp_path / "tars", "--layout", layout_file)
    assert rc == 0 and "2 shards, 10 samples" in out, err
    ds = ShardDataset(str(tmp_path / "tars"))
    assert (
        ds.key(6) == "t1x1"
        and ds.read(6)["text"].tolist() == [0, 1, 2, 3]
        and ds.meta(6) == {"t": 1}
    )
    _foreign_tars(tmp_path / "bad", bad_id=True)
    rc, _, err = cli("index", tmp_path / "bad", "--layout", layout_file)
    assert rc == 2 and "Traceback" not in err
    assert "bad/part-1.tar: sample 't1x0' text: ids span [999, 1001]" in err
    assert not (tmp_path / "bad" / "manifest.json").exists()
    rc, _, err = cli("index", tmp_path / "bad")
    assert rc == 2 and "has no manifest.json to take the layout from; pass --layout" in err


def test_reindex_keeps_layout_and_metadata(tmp_path: Path, cli: Cli, tiny_data: Path) -> None:
    """`loretta-shards index DATASET` (what the loader's messages suggest) rebuilds a lost index."""
    ds = tmp_path / "ds"
    shutil.copytree(tiny_data, ds)
    (ds / "index.npy").unlink()
    rc, _, err = cli("index", ds)
    assert rc == 0, err
    assert (ds / "index.npy").read_bytes() == (tiny_data / "index.npy").read_bytes()
    assert json.loads((ds / "manifest.json").read_text()) == json.loads(
        (tiny_data / "manifest.json").read_text()
    )


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    write_dataset(samples(), tmp_path / "ds", LAYOUT, samples_per_shard=8)
    return tmp_path / "ds"


def test_inspect_dataset_shard_and_mds(dataset: Path, tmp_path: Path, cli: Cli) -> None:
    rc, out, _ = cli("inspect", dataset, "-n", 5)
    assert rc == 0
    assert "loretta-webdataset, 4 shards, 30 samples" in out and "fixed length 16" in out
    first = samples()[0]
    ids = " ".join(str(x) for x in first["text"][:8])
    assert "ds/shard-000000.tar sample 'k000'" in out and f"[{ids} ...]" in out
    assert "image    (absent)" in out  # sample 4 has no image
    assert 'meta     {"i": 4}' in out
    rc, out, _ = cli("inspect", dataset / "shard-000001.tar", "-n", 1)
    assert rc == 0 and "8 samples" in out and "'k008'" in out and "k009" not in out
    rc, _, _ = cli("to-mds", dataset, tmp_path / "mds", "--quiet")
    rc, out, _ = cli("inspect", tmp_path / "mds", "-n", 1)
    assert rc == 0 and "loretta-mds, 4 shards, 30 samples" in out and f"[{ids} ...]" in out


def _verify_copy(src: Path, dst: Path, how: str) -> None:
    shutil.copytree(src, dst)
    man = json.loads((dst / "manifest.json").read_text())
    if how == "flip":
        shard = dst / "shard-000001.tar"
        data = bytearray(shard.read_bytes())
        data[2000] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "count":
        man["shards"][2]["samples"] += 1
        (dst / "manifest.json").write_text(json.dumps(man))
    elif how == "extra":
        shutil.copy(dst / "shard-000000.tar", dst / "shard-000009.tar")
    elif how == "missing":
        (dst / "shard-000003.tar").unlink()
    elif how == "index":
        index = np.load(dst / "index.npy")
        index["length"][3, 1] += 1
        np.save(dst / "index.npy", index)


@pytest.mark.parametrize(
    ("how", "messages"),
    [
        ("flip", ["shard-000001.tar: sha256"]),
        ("count", ["index.npy: 30 records", "manifest lists 31 samples"]),
        ("extra", ["shard-000009.tar: a shard in the folder that the manifest does not list"]),
        ("missing", ["shard-000003.tar: listed in the manifest but missing"]),
        ("index", ["index.npy: sha256", "shard-000000.tar: index.npy records differ", "'k003'"]),
    ],
)
def test_verify_finds_every_mismatch(
    dataset: Path, tmp_path: Path, cli: Cli, how: str, messages: list[str]
) -> None:
    rc, out, _ = cli("verify", dataset)
    assert rc == 0 and out.startswith("OK ")
    _verify_copy(dataset, tmp_path / "bad", how)
    rc, _, err = cli("verify", tmp_path / "bad")
    assert rc == 1 and "FAILED" in err and "Traceback" not in err
    assert all(m in err for m in messages), err


def test_verify_mds(dataset: Path, tmp_path: Path, cli: Cli) -> None:
    mds = tmp_path / "mds"
    assert cli("to-mds", dataset, mds, "--quiet")[0] == 0
    rc, out, err = cli("verify", mds)
    assert rc == 0 and "loretta-mds" in out, err
    shard = mds / "shard.00002.mds"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc, _, err = cli("verify", mds)
    assert rc == 1 and "shard.00002.mds: sha256" in err


def test_verify_and_inspect_bad_paths(tmp_path: Path, cli: Cli) -> None:
    rc, _, err = cli("verify", tmp_path / "nowhere")
    assert rc == 2 and "dataset folder" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = cli("inspect", tmp_path / "empty")
    assert rc == 2 and "manifest.json not found" in err and "loretta-shards index" in err
    (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
    rc, _, err = cli("inspect", tmp_path / "x.tar")
    assert rc == 2 and "x.tar: not a readable tar" in err


# ---- synth, MDS conversion, the console wrapper ------------------------------------------------
def test_synth_writes_the_recipe_dataset(tmp_path: Path, cli: Cli, tiny_data: Path) -> None:
    """`synth` with the tiny recipe's settings writes exactly what the recipe would generate."""
    syn = load_config("tiny").data.sources[0].synthetic
    assert syn is not None
    out = tmp_path / "syn"
    mods = [f"--modality={m}={x.size}:{x.min_len}-{x.max_len}" for m, x in syn.modalities.items()]
    rc, _, err = cli(
        "synth", out, "--samples", syn.samples, "--classes", syn.classes, "--seed", syn.seed,
        "--samples-per-shard", syn.samples_per_shard, *mods, "--quiet",
    )  # fmt: skip
    assert rc == 0, err
    mine, recipe = ShardDataset(str(out)).manifest, ShardDataset(str(tiny_data)).manifest
    assert [s.sha256 for s in mine.shards] == [s.sha256 for s in recipe.shards]
    assert mine.meta == recipe.meta  # so ensure_synthetic accepts the folder as its own
    rc, _, err = cli("synth", out, "--modality", "a=64")
    assert rc == 2 and "already exists" in err
    rc, _, err = cli("synth", tmp_path / "s2", "--modality", "a=64:9-3")
    assert rc == 2 and "1 <= min <= max" in err


def test_to_mds_and_back_through_the_cli(dataset: Path, tmp_path: Path, cli: Cli) -> None:
    rc, out, err = cli("to-mds", dataset, tmp_path / "m", "--quiet")
    assert rc == 0 and "wrote" in out and "(MDS): 4 shards, 30 samples" in out, err
    rc, out, err = cli("from-mds", tmp_path / "m", tmp_path / "w", "--quiet")
    assert rc == 0, err
    a, b = ShardDataset(str(dataset)).manifest, ShardDataset(str(tmp_path / "w")).manifest
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    rc, _, err = cli("from-mds", dataset, tmp_path / "w2")
    assert rc == 2 and "format 'loretta-webdataset', expected 'loretta-mds'" in err


def test_console_wrapper(tmp_path: Path) -> None:
    """tools/shards.py as a user runs it: usage errors and bad input exit 2, no traceback."""
    run = functools.partial(
        subprocess.run, env=base_env(), capture_output=True, text=True, timeout=120, cwd=REPO
    )
    res = run([PY, "tools/shards.py", "--help"])
    assert res.returncode == 0
    for cmd in ("layout", "write", "index", "inspect", "verify", "to-mds", "from-mds", "synth"):
        assert cmd in res.stdout
    res = run([PY, "tools/shards.py", "write", str(tmp_path / "in"), str(tmp_path / "o"), "--layout", "x.json"])  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "loretta-shards write: error: --layout x.json: file not found" in res.stderr
    res = run([PY, "tools/shards.py", "write"])
    assert res.returncode == 2 and "required" in res.stderr and "Traceback" not in res.stderr


# ---- remote tars -------------------------------------------------------------------------------
@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local http.server thread serving tmp_path/www (webdataset's gopen fetches with curl)."""
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http:// through curl, which is not installed")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_tars_equal_local_reads(
    http_root: tuple[Path, str], tmp_path: Path, cli: Cli
) -> None:
    root, base = http_root
    write_dataset(samples(), root / "ds", LAYOUT, samples_per_shard=8)
    local = ShardDataset(str(root / "ds"))
    for n, url in enumerate([f"pipe:cat {root / 'ds'}/{{}}", f"{base}/ds"]):
        remote = ShardDataset(url, cache_dir=tmp_path / f"cache{n}")
        assert len(remote) == len(local) and remote.shard_counts == local.shard_counts
        for i in range(len(local)):
            want, got = local.read(i), remote.read(i)
            assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
            assert remote.meta(i) == local.meta(i) and remote.key(i) == local.key(i)
    # the loader over http equals the loader over the folder
    out = []
    for path in (str(root / "ds"), f"{base}/ds"):
        cfg = load_config("tiny", ["--data.num_workers=2", f"--data.cache_dir={tmp_path / 'c'}"])
        cfg.data.sources = [SourceConfig(name="s", path=path)]
        it = iter(build_loader(cfg, 0, 1)[0])
        out.append([next(it) for _ in range(4)])
    for a, b in zip(*out):
        assert all(torch.equal(a[k], b[k]) for k in ROW_FIELDS)
    rc, text, err = cli("verify", f"{base}/ds", "--cache-dir", tmp_path / "vc")
    assert rc == 0 and "OK" in text, err
    (root / "ds" / "shard-000002.tar").unlink()  # a missing remote shard is named
    rc, _, err = cli("verify", f"{base}/ds", "--cache-dir", tmp_path / "vc2")
    assert rc == 1 and "could not fetch" in err and "shard-000002.tar" in err


def test_remote_tar_reads_are_whole_files(http_root: tuple[Path, str], tmp_path: Path) -> None:
    """A shard fetched over http is cached atomically: the cache never holds a partial tar."""
    root, base = http_root
    write_dataset(samples(), root / "ds", LAYOUT, samples_per_shard=8)
    ds = ShardDataset(f"{base}/ds", cache_dir=tmp_path / "c")
    ds.read(9)
    cached = sorted(p.name for p in ds.local.iterdir())
    assert cached == ["index.npy", "manifest.json", "shard-000001.tar"]  # no temp files
    assert sha256_file(ds.local / "shard-000001.tar") == ds.manifest.shards[1].sha256
    with tarfile.open(ds.local / "shard-000001.tar") as tf:
        assert tf.getnames()[:2] == ["k008.image.npy", "k008.json"]


# ---- docs --------------------------------------------------------------------------------------
def test_docs_walkthrough_runs(tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/data.md's walkthrough, command by command, on its own example input."""
    text = (REPO / "docs" / "data.md").read_text()
    section = text.split("## Walkthrough", 1)[1].split("\n## ", 1)[0]
    jsonl = re.search(r"```jsonl\n(.*?)```", section, re.S)
    bash = re.search(r"```bash\n(.*?)```", section, re.S)
    assert jsonl and bash
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples.jsonl").write_text(jsonl.group(1))
    commands = [c for c in bash.group(1).splitlines() if c.strip()]
    assert len(commands) >= 8 and all(c.startswith("loretta-shards ") for c in commands)
    for command in commands:
        rc, _, err = cli(*shlex.split(command)[1:], *(["--quiet"] if _quiet(command) else []))
        assert rc == 0, (command, err)
    ds = ShardDataset("data/pairs")
    assert (
        ds.key(1) == "000002" and set(ds.read(1)) == {"image"} and ds.meta(1) == {"source": "demo"}
    )


def _quiet(command: str) -> bool:
    return command.split()[1] in ("write", "synth", "to-mds", "from-mds")
