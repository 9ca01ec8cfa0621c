"""Seeded bad-data fuzz suite: every way a dataset can be damaged has one exact outcome.

A dataset is written once with the real writer; each case copies it, damages the copy and then
asserts one of

* ``open``: opening the dataset raises a DataError whose message names the file or field and
  the fix;
* ``read``: the dataset opens, and reading the damaged sample raises such a DataError (every
  other sample still reads);
* ``skip``: as ``read``, and a loader with ``data.on_error=skip`` counts the sample as skipped
  and never puts it in a produced row;
* ``index``: indexing the damaged tars (`loretta-shards index`) raises such a DataError.

No training runs: datasets are opened and the loader iterated in this process.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loretta.config import SourceConfig, SyntheticConfig, SynthModality, load_config
from loretta.data.format import index_dtype_v1, member_crc, sha256_file
from loretta.data.loader import build_loader, open_sources
from loretta.data.shards import ShardDataset, index_dataset, write_dataset
from loretta.data.sources import open_dataset
from loretta.errors import DataError
from loretta.vocab import VocabLayout

LAYOUT = VocabLayout.build({"a": 50, "b": 300})
N, PER_SHARD = 24, 8
REINDEX = "loretta-shards index"
MANIFEST_FIX = f"rebuild the manifest with `{REINDEX}"
SHARD_FIX = "restore it"


def _samples() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    return [
        {
            "key": f"s{i:04d}",
            "meta": {"i": i},
            "a": rng.integers(0, 50, int(rng.integers(6, 30))),
            "b": rng.integers(0, 300, int(rng.integers(6, 30))),
        }
        for i in range(N)
    ]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "clean"
    write_dataset(_samples(), out, LAYOUT, samples_per_shard=PER_SHARD)
    return out


# ---- damage ------------------------------------------------------------------------------------
def _index(d: Path) -> np.ndarray:
    return np.load(d / "index.npy")


def _shard(d: Path, i: int) -> Path:
    return d / f"shard-{int(_index(d)['shard'][i]):06d}.tar"


def _flip(d: Path, i: int, mod: int, where: str, bit: int) -> None:
    """Flip `bit` of one byte of sample i's member `mod`: 'last' = the last token's low byte,
    'magic' = the .npy magic, 'header' = inside the .npy header."""
    rec = _index(d)[i]
    off, nb = int(rec["offset"][mod]), int(rec["nbytes"][mod])
    pos = {"last": off + nb - 2, "magic": off + 1, "header": off + 20}[where]
    _flip_at(_shard(d, i), pos, bit)


def _flip_at(path: Path, pos: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))


def _random_flip(seed: int) -> Callable[[Path], int]:
    """A seeded flip of one random bit of one random token payload; returns the sample."""

    def damage(d: Path) -> int:
        rng = np.random.default_rng(seed)
        i, mod = int(rng.integers(N)), int(rng.integers(2))
        rec = _index(d)[i]
        off, nb = int(rec["offset"][mod]), int(rec["nbytes"][mod])
        n = int(rec["length"][mod])
        data_start = off + nb - 2 * n  # uint16 ids: the payload is the member's tail
        _flip_at(_shard(d, i), int(rng.integers(data_start, off + nb)), int(rng.integers(8)))
        return i

    return damage


def _save_index(d: Path, index: np.ndarray, update_sha: bool) -> None:
    np.save(d / "index.npy", index, allow_pickle=True)
    if update_sha:  # as a tool that rewrote the index and its manifest entry would
        _edit_manifest(d, lambda m: m["index"].__setitem__("sha256", sha256_file(d / "index.npy")))


def _edit_index(fn: Callable[[np.ndarray], Any], update_sha: bool) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        index = _index(d)
        out = fn(index)
        _save_index(d, index if out is None else out, update_sha)

    return damage


def _edit_manifest(d: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)  # edits m in place
    (d / "manifest.json").write_text(json.dumps(m))


def _manifest(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return lambda d: _edit_manifest(d, fn)


def _shard0(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["shards"][0].__setitem__(key, value)


def _truncate(n_bytes: int | None) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        p = d / "shard-000002.tar"
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2] if n_bytes is None else data[:-n_bytes])

    return damage


def _point_at_other(d: Path) -> None:
    """Record 3 takes sample 5's member locations, sizes, token counts and CRCs; the manifest's
    token totals and index sha256 are made consistent, as a buggy tool would."""
    index = _index(d)
    for f in ("offset", "nbytes", "length", "crc"):
        index[3][f] = index[5][f]
    _save_index(d, index, update_sha=False)
    lengths = index["length"][:PER_SHARD].sum(axis=0)

    def fix(m: dict[str, Any]) -> None:
        m["shards"][0]["tokens"] = {n: int(t) for n, t in zip(LAYOUT.names, lengths)}
        m["tokens"] = {
            n: sum(s["tokens"][n] for s in m["shards"]) for n in LAYOUT.names
        }  # totals too
        m["index"]["sha256"] = sha256_file(d / "index.npy")

    _edit_manifest(d, fix)


def _rewrite_member(
    i: int, mod: int, fn: Callable[[bytearray, int], None]
) -> Callable[[Path], None]:
    """Rewrite sample i's member in place (same size) and re-seal its CRC, index and manifest
    sha, as a tool that rewrote the shard and its index would: only the decoded checks remain."""

    def damage(d: Path) -> None:
        index = _index(d)
        rec = index[i]
        off, nb = int(rec["offset"][mod]), int(rec["nbytes"][mod])
        path = _shard(d, i)
        data = bytearray(path.read_bytes())
        member = bytearray(data[off : off + nb])
        fn(member, int(rec["length"][mod]))
        data[off : off + nb] = member
        path.write_bytes(bytes(data))
        index[i]["crc"][mod] = member_crc(bytes(rec["key"]), bytes(member))
        _save_index(d, index, update_sha=True)
        sha = sha256_file(path)
        _edit_manifest(d, lambda m: m["shards"][int(rec["shard"])].__setitem__("sha256", sha))

    return damage


def _id_out_of_range(member: bytearray, n: int) -> None:
    member[-2:] = (299).to_bytes(2, "little")  # modality a has 50 ids; still a valid uint16


def _float_header(member: bytearray, n: int) -> None:
    at = member.index(b"<u2")
    member[at : at + 3] = b"<f2"  # same item size: the payload decodes as float16


def _old_format(index: np.ndarray) -> np.ndarray:
    old = np.zeros(len(index), index_dtype_v1(2))
    for f in old.dtype.names or ():
        old[f] = index[f]
    return old


def _raw_tar(members: dict[str, bytes]) -> Callable[[Path], None]:
    """Replace the dataset by a folder of one tar holding `members` (then index it)."""

    def damage(d: Path) -> None:
        for p in d.iterdir():
            p.unlink()
        with tarfile.open(d / "shard-000000.tar", "w") as tf:
            for name, blob in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))

    return damage


def _npy(arr: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, arr, allow_pickle=False)
    return f.getvalue()


GOOD_A = _npy(np.arange(5, dtype=np.uint16))


@dataclass
class Case:
    damage: Callable[[Path], Any]  # may return the damaged sample
    expect: str  # open | read | skip | index
    match: str  # regex the DataError's message must match
    sample: int = -1  # the damaged sample (read/skip)
    same_plan: bool = True  # token counts untouched: the stream plans exactly the clean rows


CRC = r"shard-00000\d\.tar sample 's\d{4}' [ab]\.npy: bytes differ from their CRC32 in index\.npy.*restore it"
SHA_INDEX = (
    r"index\.npy: sha256 .* differs from the manifest's index\.sha256.*`loretta-shards index"
)
OPEN_SHARD = r"shard-000002\.tar: \d+ bytes but the manifest says \d+.*restore it or rebuild"


def _field(name: str, what: str = "is not a count") -> str:
    return rf"manifest\.json: field {re.escape(repr(name))} = .* {what}.*{re.escape(MANIFEST_FIX)}"


CASES: dict[str, Case] = {
    # ---- bytes of token payloads: caught by the member CRC on every read ----
    "flip-low-bit-a": Case(lambda d: _flip(d, 3, 0, "last", 0), "skip", CRC, 3),
    "flip-low-bit-b-shard1": Case(lambda d: _flip(d, 12, 1, "last", 0), "skip", CRC, 12),
    "flip-high-bit-b-shard2": Case(lambda d: _flip(d, 20, 1, "last", 7), "skip", CRC, 20),
    "flip-npy-magic": Case(lambda d: _flip(d, 5, 0, "magic", 3), "skip", CRC, 5),
    "flip-npy-header": Case(lambda d: _flip(d, 9, 1, "header", 1), "skip", CRC, 9),
    **{f"random-flip-seed{s}": Case(_random_flip(s), "skip", CRC) for s in range(8)},
    "flip-meta-json": Case(
        lambda d: _flip_at(_shard(d, 7), int(_index(d)[7]["meta_offset"]) + 2, 0),
        "read",
        r"s0007\.json differs from its CRC32 in index\.npy.*restore it",
        7,
    ),
    # ---- decoded checks behind the CRC (a tool re-sealed a bad member) ----
    "id-out-of-range-resealed": Case(
        _rewrite_member(4, 0, _id_out_of_range),
        "skip",
        r"sample 's0004' a: ids span \[\d+, 299\] but the modality has 50 ids.*re-tokenise",
        4,
    ),
    "float-dtype-resealed": Case(
        _rewrite_member(6, 0, _float_header),
        "skip",
        r"sample 's0006' a: token array has dtype float16; expected integers.*re-tokenise",
        6,
    ),
    # ---- shard files ----
    "truncate-shard-half": Case(_truncate(None), "open", OPEN_SHARD),
    "truncate-shard-1-byte": Case(_truncate(1), "open", OPEN_SHARD),
    "grown-shard": Case(
        lambda d: (d / "shard-000002.tar").open("ab").write(b"\0" * 512), "open", OPEN_SHARD
    ),
    "missing-shard": Case(
        lambda d: (d / "shard-000001.tar").unlink(),
        "open",
        r"shard-000001\.tar: shard listed in the manifest is missing.*restore it",
    ),
    # ---- index.npy ----
    "index-truncated": Case(
        lambda d: (d / "index.npy").write_bytes((d / "index.npy").read_bytes()[:300]),
        "open",
        SHA_INDEX,
    ),
    "index-garbage": Case(
        lambda d: (d / "index.npy").write_bytes(np.random.default_rng(1).bytes(4096)),
        "open",
        SHA_INDEX,
    ),
    "index-missing": Case(
        lambda d: (d / "index.npy").unlink(),
        "open",
        r"index\.npy not found; rebuild it with `loretta-shards index",
    ),
    "index-length-zeroed": Case(
        _edit_index(lambda x: x[3]["length"].__setitem__(0, 0), False), "open", SHA_INDEX
    ),
    "index-length-zeroed-resealed": Case(
        _edit_index(lambda x: x[3]["length"].__setitem__(0, 0), True),
        "open",
        r"index\.npy: shard shard-000000\.tar holds tokens .* by the index but .* by the manifest.*`loretta-shards index",
    ),
    "index-points-at-other-sample": Case(
        _edit_index(lambda x: x[3].__setitem__("offset", x[5]["offset"]), False), "open", SHA_INDEX
    ),
    "index-points-at-other-sample-resealed": Case(_point_at_other, "skip", CRC, 3, False),
    "index-offset-out-of-range-resealed": Case(
        _edit_index(lambda x: x[10]["offset"].__setitem__(1, 10**9), True),
        "open",
        r"index\.npy: record 10 \('s0010'\) points outside its shard shard-000001\.tar.*`loretta-shards index",
    ),
    "index-shard-id-out-of-range-resealed": Case(
        _edit_index(lambda x: x[2].__setitem__("shard", 99), True),
        "open",
        r"index\.npy: record 2 is in shard 99 but the manifest's shard table.*`loretta-shards index",
    ),
    "index-negative-length-resealed": Case(
        _edit_index(lambda x: x[2]["length"].__setitem__(1, -4), True),
        "open",
        r"index\.npy: record 2 has a negative token count; rebuild with `loretta-shards index",
    ),
    "index-old-format-without-crc": Case(
        _edit_index(_old_format, True),
        "open",
        r"index\.npy: an index without per-sample checksums.*rebuild it with `loretta-shards index",
    ),
    "index-record-dropped-resealed": Case(
        _edit_index(lambda x: x[:-1], True),
        "open",
        r"index\.npy: index has 23 records .* manifest lists 24 samples.*`loretta-shards index",
    ),
    "index-pickled-object-resealed": Case(
        _edit_index(lambda x: np.array([{"x": 1}], dtype=object), True),
        "open",
        r"index\.npy: unreadable index .*rebuild it with `loretta-shards index",
    ),
    # ---- manifest.json ----
    "manifest-json-list": Case(
        lambda d: (d / "manifest.json").write_text(f"[{(d / 'manifest.json').read_text()}]"),
        "open",
        rf"manifest\.json: expected a JSON object, got a JSON list.*{MANIFEST_FIX}",
    ),
    "manifest-not-json": Case(
        lambda d: (d / "manifest.json").write_text('{"format": "loretta-'),
        "open",
        r"manifest\.json: not valid JSON .*the manifest is corrupt",
    ),
    "manifest-samples-string": Case(
        _manifest(lambda m: m.__setitem__("samples", "100")), "open", _field("samples")
    ),
    "manifest-shard-samples-string": Case(
        _manifest(_shard0("samples", "8")), "open", _field("shards[0].samples")
    ),
    "manifest-shard-samples-negative": Case(
        _manifest(_shard0("samples", -1)), "open", _field("shards[0].samples")
    ),
    "manifest-shard-bytes-float": Case(
        _manifest(_shard0("bytes", 1.5)), "open", _field("shards[0].bytes")
    ),
    "manifest-shard-bytes-bool": Case(
        _manifest(_shard0("bytes", True)), "open", _field("shards[0].bytes")
    ),
    "manifest-shard-tokens-string": Case(
        _manifest(lambda m: m["shards"][1]["tokens"].__setitem__("a", "12")),
        "open",
        _field("shards[1].tokens.a"),
    ),
    "manifest-shard-tokens-unknown-modality": Case(
        _manifest(lambda m: m["shards"][1]["tokens"].__setitem__("zz", 3)),
        "open",
        rf"field 'shards\[1\]\.tokens' names modality 'zz', not in the layout.*{MANIFEST_FIX}",
    ),
    "manifest-shard-unknown-field": Case(
        _manifest(_shard0("size", 3)),
        "open",
        rf"field 'shards\[0\]' has unknown fields \['size'\].*{MANIFEST_FIX}",
    ),
    "manifest-shard-missing-sha256": Case(
        _manifest(lambda m: m["shards"][0].pop("sha256")),
        "open",
        rf"field 'shards\[0\]\.sha256' is missing.*{MANIFEST_FIX}",
    ),
    "manifest-missing-shards": Case(
        _manifest(lambda m: m.pop("shards")),
        "open",
        rf"required field 'shards' is missing.*{MANIFEST_FIX}",
    ),
    "manifest-missing-layout": Case(
        _manifest(lambda m: m.pop("layout")),
        "open",
        rf"required field 'layout' is missing.*{MANIFEST_FIX}",
    ),
    "manifest-shards-object": Case(
        _manifest(lambda m: m.__setitem__("shards", {"0": m["shards"][0]})),
        "open",
        rf"field 'shards' = .* is not a non-empty list.*{MANIFEST_FIX}",
    ),
    "manifest-shards-empty": Case(
        _manifest(lambda m: m.__setitem__("shards", [])),
        "open",
        rf"field 'shards' = \[\] is not a non-empty list.*{MANIFEST_FIX}",
    ),
    "manifest-shard-samples-changed": Case(
        _manifest(_shard0("samples", 9)),
        "open",
        r"index\.npy: index has 24 records .* manifest lists 25 samples.*`loretta-shards index",
    ),
    "manifest-shard-tokens-changed": Case(
        _manifest(
            lambda m: m["shards"][2]["tokens"].__setitem__("b", m["shards"][2]["tokens"]["b"] + 1)
        ),
        "open",
        r"shard shard-000002\.tar holds tokens .* by the index but .* by the manifest",
    ),
    "manifest-no-index-sha": Case(
        _manifest(lambda m: m["index"].pop("sha256")),
        "open",
        r"index\.npy: the manifest records no index\.sha256.*`loretta-shards index",
    ),
    "manifest-index-string": Case(
        _manifest(lambda m: m.__setitem__("index", "index.npy")),
        "open",
        rf"field 'index' = 'index\.npy' is a str, expected a JSON object.*{MANIFEST_FIX}",
    ),
    "manifest-meta-list": Case(
        _manifest(lambda m: m.__setitem__("meta", [])),
        "open",
        rf"field 'meta' = \[\] is a list, expected a JSON object.*{MANIFEST_FIX}",
    ),
    "manifest-version-string": Case(
        _manifest(lambda m: m.__setitem__("version", "2")),
        "open",
        r"manifest\.json: field 'version' = '2' is not a version",
    ),
    "manifest-version-newer": Case(
        _manifest(lambda m: m.__setitem__("version", 99)),
        "open",
        r"manifest version 99 is newer than this loretta understands.*upgrade loretta",
    ),
    "hostile-shard-name-dotdot": Case(
        _manifest(_shard0("name", "../../x.tar")),
        "open",
        r"field 'shards\[0\]\.name' \(shard name\) '\.\./\.\./x\.tar' is not a plain file name.*loretta-shards index",
    ),
    "hostile-shard-name-shell": Case(
        _manifest(_shard0("name", "a.tar; touch pwned")),
        "open",
        r"'a\.tar; touch pwned' is not a plain file name.*loretta-shards index",
    ),
    "hostile-shard-name-absolute": Case(
        _manifest(_shard0("name", "/etc/passwd")),
        "open",
        r"'/etc/passwd' is not a plain file name",
    ),
    "hostile-shard-name-not-string": Case(
        _manifest(_shard0("name", 7)), "open", r"shard name\) 7 is not a plain file name"
    ),
    # ---- members of tars being indexed (`loretta-shards index`) ----
    "member-float-dtype": Case(
        _raw_tar({"k0.a.npy": _npy(np.ones(4, np.float32))}),
        "index",
        r"shard-000000\.tar: sample 'k0' a: token array has dtype float32; expected integers.*re-tokenise",
    ),
    "member-2d": Case(
        _raw_tar({"k0.a.npy": _npy(np.ones((2, 2), np.uint16))}),
        "index",
        r"sample 'k0' a: token array has shape \(2, 2\); expected 1-D ids.*re-tokenise",
    ),
    "member-ids-out-of-range": Case(
        _raw_tar({"k0.a.npy": _npy(np.array([1, 50], np.uint16))}),
        "index",
        r"sample 'k0' a: ids span \[1, 50\] but the modality has 50 ids.*re-tokenise or enlarge",
    ),
    "member-negative-ids": Case(
        _raw_tar({"k0.b.npy": _npy(np.array([-1, 3], np.int32))}),
        "index",
        r"sample 'k0' b: ids span \[-1, 3\]",
    ),
    "member-missing-modalities": Case(
        _raw_tar({"k0.a.npy": GOOD_A, "k1.json": b"{}"}),
        "index",
        r"shard-000000\.tar: sample 'k1' has no \.npy modality members",
    ),
    "member-unknown-modality": Case(
        _raw_tar({"k0.zz.npy": GOOD_A}),
        "index",
        r"sample 'k0' has modality 'zz', not in the layout .*rebuild with a layout",
    ),
    "member-not-npy": Case(
        _raw_tar({"k0.a.npy": b"\x93NUMPX" + GOOD_A[6:]}),
        "index",
        r"sample 'k0' member k0\.a\.npy: not an \.npy array \(bad magic\)",
    ),
    "member-object-dtype": Case(
        _raw_tar({"k0.a.npy": _npy(np.zeros(5, np.uint64)).replace(b"<u8", b"|O8")}),
        "index",
        r"sample 'k0' member k0\.a\.npy: object dtype.*refused",
    ),
    "member-object-dtype-short": Case(
        _raw_tar({"k0.a.npy": GOOD_A.replace(b"<u2", b"|O8")}),
        "index",
        r"sample 'k0' member k0\.a\.npy: object dtype.*refused",
    ),
}


def _cfg(path: Path, on_error: str) -> Any:
    cfg = load_config(
        "tiny",
        [f"--data.on_error={on_error}", "--data.micro_batch_size=4", "--data.pack_lookahead=1"],
    )
    cfg.data.sources = [SourceConfig(name="s", path=str(path))]
    return cfg


def _rows(path: Path, on_error: str, batches: int = 4) -> list[dict[str, Any]]:
    it = iter(build_loader(_cfg(path, on_error), 0, 1)[0])
    return [next(it) for _ in range(batches)]


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_bad_data(clean: Path, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    bad = tmp_path / "bad"
    shutil.copytree(clean, bad)
    hit = case.damage(bad)
    sample = hit if isinstance(hit, int) else case.sample
    if case.expect == "index":
        with pytest.raises(DataError, match=case.match):
            index_dataset(bad, LAYOUT)
        return
    if case.expect == "open":
        with pytest.raises(DataError, match=case.match):
            open_dataset(bad)
        assert not (Path.cwd() / "pwned").exists()
        return
    ds = open_dataset(bad)
    assert 0 <= sample < N
    for i in range(N):  # exactly the damaged sample fails
        if i == sample:
            with pytest.raises(DataError, match=case.match):
                ds.read(i)
                ds.meta(i)
        else:
            ds.read(i)
            ds.meta(i)
    if case.expect != "skip":
        return
    with pytest.raises(DataError, match=case.match):
        _rows(bad, "raise")
    rows = _rows(bad, "skip")
    docs = np.concatenate([b["docs"] for b in rows])
    skipped = np.concatenate([b["skipped_docs"] for b in rows])
    assert sample not in docs[:, 2]  # never trained on
    assert set(skipped[:, 2].tolist()) == {sample}  # and counted as skipped
    assert rows[-1]["read_errors"] == len(skipped) >= 1
    if not case.same_plan:
        return
    clean_rows = _rows(clean, "skip")  # the rest of the stream is untouched
    clean_docs = np.concatenate([b["docs"] for b in clean_rows])
    assert np.array_equal(clean_docs[clean_docs[:, 2] != sample], docs)


def test_case_count() -> None:
    assert len(CASES) >= 40


def test_clean_dataset_reads_and_loads(clean: Path) -> None:
    ds = ShardDataset(str(clean))
    for i, arrays in ds.iter_samples():
        assert set(arrays) == {"a", "b"} and ds.meta(i) == {"i": i}
    rows = _rows(clean, "raise")
    assert all(b["read_errors"] == 0 and len(b["skipped_docs"]) == 0 for b in rows)


# ---- synthetic data only where asked -----------------------------------------------------------
SYN = SyntheticConfig(samples=20, samples_per_shard=10, modalities={"a": SynthModality(size=16)})


def test_synthetic_only_where_asked(tmp_path: Path) -> None:
    cfg = load_config("tiny")
    typo = tmp_path / "typo"
    cfg.data.sources = [SourceConfig(name="s", path=str(typo), synthetic=SYN)]
    with pytest.raises(DataError, match=rf"path='{typo}': no dataset there.*path=synthetic:{typo}"):
        open_sources(cfg.data, 0)
    assert not typo.exists()  # nothing generated at a plain path
    cfg.data.sources[0].path = f"synthetic:{tmp_path / 'gen'}"
    datasets, _ = open_sources(cfg.data, 0)
    assert len(datasets[0]) == 20 and (tmp_path / "gen" / "manifest.json").exists()
    cfg.data.sources[0].path = str(tmp_path / "gen")  # once written, a plain path reads it
    assert len(open_sources(cfg.data, 0)[0][0]) == 20
    cfg.data.sources = [SourceConfig(name="s", path=f"synthetic:{tmp_path / 'x'}")]
    with pytest.raises(DataError, match="asks for synthetic data but the source has no synthetic"):
        open_sources(cfg.data, 0)


def test_recipes_ask_for_their_synthetic_data() -> None:
    for recipe in ("tiny", "tiny_loretta"):
        for s in load_config(recipe).data.sources:
            assert s.synthetic is not None and s.path.startswith("synthetic:"), (recipe, s.path)


# ---- MDS: a flipped byte in a sample is caught by our per-sample CRC ---------------------------
def test_mds_low_bit_flip_caught(clean: Path, tmp_path: Path, private_tmpdir: Path) -> None:
    from loretta.data.mds_convert import to_mds

    mds = tmp_path / "mds"
    to_mds(clean, mds)
    ds = ShardDataset(str(clean))
    ids = ds.read(11)["b"].astype(np.uint16).tobytes()  # stored as uint16 in shard 1
    shard = mds / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    at = data.find(ids)
    assert at > 0 and data.find(ids, at + 1) < 0
    data[at + len(ids) - 2] ^= 1  # the low bit of the last id
    shard.write_bytes(bytes(data))
    # streaming checks no hashes of local shards (validate_hash needs hashes in index.json and
    # applies on download), and loretta's sha256 of shards only with verify_checksums
    mds_ds = open_dataset(mds)
    with pytest.raises(
        DataError,
        match=r"shard\.00001\.mds sample 's0011' b: ids differ from their CRC32 in loretta_index\.npy",
    ):
        mds_ds.read(11)
    for i in (0, 10, 12, 23):
        mds_ds.read(i)


def test_synthetic_data_of_an_older_format_is_generated_again(tmp_path: Path) -> None:
    from loretta.data.synthetic import ensure_synthetic

    ensure_synthetic(tmp_path / "syn", SYN)
    _edit_manifest(tmp_path / "syn", lambda m: m.__setitem__("version", 1))
    ensure_synthetic(tmp_path / "syn", SYN)  # same config, older format: written again
    assert json.loads((tmp_path / "syn" / "manifest.json").read_text())["version"] >= 2
    assert len(open_dataset(tmp_path / "syn")) == 20


def test_random_byte_flips_anywhere_never_yield_wrong_samples(clean: Path, tmp_path: Path) -> None:
    """300 seeded flips of one random bit anywhere in the dataset's files (shards, index,
    manifest): opening refuses the dataset, or every sample reads back exactly or raises a
    DataError, never silently different data and never another exception."""
    good = ShardDataset(str(clean))
    want = [({k: v.copy() for k, v in good.read(i).items()}, good.meta(i)) for i in range(N)]
    files = sorted(p.name for p in clean.iterdir())
    originals = {f: (clean / f).read_bytes() for f in files}
    bad = tmp_path / "bad"
    shutil.copytree(clean, bad)
    rng = np.random.default_rng(2026)
    outcomes = {"refused": 0, "caught": 0, "harmless": 0}
    for _ in range(300):
        name = files[int(rng.integers(len(files)))]
        data = bytearray(originals[name])
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        (bad / name).write_bytes(bytes(data))
        try:
            ds = open_dataset(bad)
        except DataError:
            outcomes["refused"] += 1
        else:
            caught = False
            for i in range(N):
                try:
                    arrays, meta = ds.read(i), ds.meta(i)
                except DataError:
                    caught = True
                    continue
                assert meta == want[i][1], (name, i)
                assert arrays.keys() == want[i][0].keys(), (name, i)
                for k, v in arrays.items():
                    assert np.array_equal(v, want[i][0][k]), (name, i, k)
            outcomes["caught" if caught else "harmless"] += 1  # harmless: a tar header byte
            ds.close()
        (bad / name).write_bytes(originals[name])
    # most bytes of a tar of small samples are headers and padding, which the reader never uses
    assert outcomes["refused"] > 50 and outcomes["caught"] > 10, outcomes
