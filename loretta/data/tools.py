"""`loretta-shards`: create, inspect, verify and convert datasets (tools/shards.py is a wrapper).

    loretta-shards layout layout.json --modality image=256 --modality text=32000 --fixed image=784
    loretta-shards write samples/ data/pairs --layout layout.json --shard-size 64MB --workers 4
    loretta-shards index data/tars --layout layout.json
    loretta-shards inspect data/pairs -n 3           # a dataset folder or URL, or one .tar shard
    loretta-shards verify data/pairs
    loretta-shards to-mds data/pairs data/pairs-mds
    loretta-shards from-mds data/pairs-mds data/pairs-again
    loretta-shards synth data/synth --samples 1000 --modality a=64 --modality b=64:8-32

`write` reads pre-tokenized samples (local ids) from a folder of .npz files (one per sample,
arrays named by modality, key = file name), a folder of {key}.{modality}.npy files, or JSON lines
{"key": ..., "<modality>": [ids], "meta": {...}} (a .jsonl file or a folder of them); a
{key}.json file next to an .npz or .npy sample holds its metadata. Exit codes: 0 done, 1 `verify`
found problems, 2 bad input (the message names the file, field and value, and the fix).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loretta.data.format import (
    KEY_BYTES,
    Manifest,
    atomic_write_json,
    check_ids,
    index_dtype,
    parse_npy,
    scan_shard,
    sha256_file,
    split_member,
)
from loretta.data.shards import Sample, is_url
from loretta.errors import DataError, LorettaError
from loretta.vocab import VocabLayout

PROG = "loretta-shards"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# ==== argument parsing helpers =================================================================
def parse_size(text: str, what: str = "--shard-size") -> int:
    """'64MB' -> 67108864. Binary units: K/KB/KiB = 1024 bytes, M/MB/MiB, G/GB/GiB, T."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise DataError(f"{what}={text!r}: expected a positive size such as 64MB, 512KB or 1GB")
    return max(1, int(float(m.group(1)) * _UNITS[m.group(2)]))


def parse_modality(text: str, with_lengths: bool = False) -> tuple[str, int, tuple[int, int]]:
    """'image=256' -> ('image', 256, (0, 0)); with lengths also 'a=64:8-32' -> (8, 32)."""
    pattern = r"([A-Za-z_]\w*)=(\d+)" + (r"(?::(\d+)-(\d+))?" if with_lengths else "")
    m = re.fullmatch(pattern, text.strip())
    if not m:
        example = "a=64 or a=64:8-32 (size, then min-max tokens)" if with_lengths else "image=256"
        raise DataError(f"--modality {text!r}: expected NAME=SIZE, e.g. {example}")
    lens = (0, 0)
    if with_lengths and m.group(3) is not None:
        lens = (int(m.group(3)), int(m.group(4)))
    return m.group(1), int(m.group(2)), lens


def load_layout(path: str) -> VocabLayout:
    """A layout from layout.json, a dataset's manifest.json, or a folder holding either."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("layout.json", "manifest.json") if (p / n).exists()]
        if not found:
            raise DataError(
                f"--layout {path}: the folder has neither layout.json nor manifest.json; create "
                f"a layout with `{PROG} layout layout.json --modality NAME=SIZE ...`"
            )
        p = found[0]
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(
            f"--layout {path}: file not found; create it with "
            f"`{PROG} layout {path} --modality NAME=SIZE ...`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"--layout {p}: not valid JSON ({e})") from e
    if isinstance(d, dict) and isinstance(d.get("layout"), dict):
        d = d["layout"]  # a manifest
    if not isinstance(d, dict):
        raise DataError(f"--layout {p}: expected a JSON object, got {type(d).__name__}")
    return VocabLayout.from_dict(d, str(p))


def describe_layout(layout: VocabLayout) -> str:
    parts = [
        f"{m.name}: {m.token}={m.token_id}, ids [{m.offset}, {m.stop}) ({m.size}"
        + (f", fixed length {m.fixed_length})" if m.fixed_length is not None else ")")
        for m in layout.modalities
    ]
    return f"vocab {layout.size} ids; pad {layout.pad_id}, bos {layout.bos_id}, eos " + (
        f"{layout.eos_id} | " + " | ".join(parts)
    )


# ==== input readers for `write` ================================================================
def _check_key(key: str, where: str, seen: set[str]) -> None:
    if not key or "." in key or len(key.encode()) > KEY_BYTES:
        raise DataError(
            f"{where}: sample key {key!r} must be 1..{KEY_BYTES} bytes without '.'; rename it"
        )
    if key in seen:
        raise DataError(f"{where}: sample key {key!r} appears twice; keys must be unique")
    seen.add(key)


def _not_a_modality(name: str, layout: VocabLayout, where: str) -> DataError:
    return DataError(
        f"{where}: {name!r} is not a modality of the layout {layout.names}; rename it, "
        f"or add it to the layout (`{PROG} layout ... --modality {name}=SIZE`)"
    )


def _check_arrays(values: dict[str, Any], layout: VocabLayout, where: str) -> dict[str, Any]:
    """Validated 1-D integer id arrays per modality (empty ones are left out: absent)."""
    out: dict[str, Any] = {}
    for name, v in values.items():
        if name not in layout:
            raise _not_a_modality(name, layout, where)
        arr = np.asarray(v)
        if arr.size == 0 and arr.ndim == 1:
            continue
        if arr.dtype == object:
            raise DataError(f"{where}: {name} must be a flat list of integer ids (got {v!r:.60})")
        check_ids(arr, layout[name].size, f"{where}: {name}")
        fixed = layout[name].fixed_length
        if fixed is not None and arr.size != fixed:
            raise DataError(
                f"{where}: {name} has {arr.size} tokens but the layout fixes {name} at {fixed}; "
                "re-tokenise the sample, or drop --fixed from the layout"
            )
        out[name] = arr
    if not out:
        raise DataError(f"{where}: no token ids for any modality of the layout {layout.names}")
    return out


def _sidecar_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path}: metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def _read_npz(files: list[Path], layout: VocabLayout) -> Iterator[Sample]:
    seen: set[str] = set()
    for f in files:
        key = f.name[: -len(".npz")]
        _check_key(key, str(f), seen)
        try:
            with np.load(f, allow_pickle=False) as z:
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive")
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{f}: unreadable .npz ({type(e).__name__}: {e})") from e
        meta = _sidecar_meta(f.with_name(f"{key}.json"))
        yield {"key": key, **_check_arrays(arrays, layout, str(f)), "meta": meta}


def _npy_groups(folder: Path) -> dict[str, dict[str, Path]]:
    groups: dict[str, dict[str, Path]] = {}
    for f in sorted(folder.glob("*.npy")):
        key, rest = f.name.split(".", 1)
        groups.setdefault(key, {})[rest[: -len(".npy")]] = f
    return groups


def _read_npy(groups: dict[str, dict[str, Path]], layout: VocabLayout) -> Iterator[Sample]:
    seen: set[str] = set()
    for key in sorted(groups):
        files = groups[key]
        where = str(next(iter(files.values())).with_name(f"{key}.*.npy"))
        _check_key(key, where, seen)
        arrays = {}
        for mod, f in files.items():
            if mod not in layout:
                raise _not_a_modality(mod, layout, str(f))
            arrays[mod] = parse_npy(f.read_bytes(), str(f))
        meta = _sidecar_meta(f.parent / f"{key}.json")
        yield {"key": key, **_check_arrays(arrays, layout, where), "meta": meta}


def _read_jsonl(files: list[Path], layout: VocabLayout) -> Iterator[Sample]:
    seen: set[str] = set()
    for f in files:
        with open(f, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{lineno}"
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{where}: not valid JSON ({e})") from e
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                key = obj.pop("key", None)
                if not isinstance(key, str):
                    raise DataError(
                        f'{where}: "key" is {key!r}; every line needs a string "key" field'
                    )
                _check_key(key, where, seen)
                meta = obj.pop("meta", None) or {}
                if not isinstance(meta, dict):
                    raise DataError(f'{where}: "meta" must be a JSON object, got {meta!r:.60}')
                yield {"key": key, **_check_arrays(obj, layout, where), "meta": meta}


def _count_lines(files: list[Path]) -> int:
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            n += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    return n


def open_input(path: Path, fmt: str, layout: VocabLayout) -> tuple[Iterator[Sample], int]:
    """The samples of a `write` input and their count."""
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    kinds = {"npz": "*.npz", "npy": "*.npy", "jsonl": "*.jsonl"}
    if path.is_file():
        if fmt == "auto" and path.suffix not in (".jsonl", ".json", ".ndjson"):
            raise DataError(
                f"{path}: a single input file must be JSON lines (.jsonl); give a folder of .npz "
                "or {key}.{modality}.npy files, or pass --format jsonl"
            )
        if fmt not in ("auto", "jsonl"):
            raise DataError(f"{path}: --format {fmt} needs a folder, not a file")
        return _read_jsonl([path], layout), _count_lines([path])
    if fmt == "auto":
        found = [k for k, pat in kinds.items() if next(path.glob(pat), None) is not None]
        if not found:
            raise DataError(
                f"{path}: no .npz, .npy or .jsonl files found; see `{PROG} write --help` for the "
                "input formats"
            )
        if len(found) > 1:
            raise DataError(f"{path}: holds {found} files; choose one with --format")
        fmt = found[0]
    files = sorted(path.glob(kinds[fmt]))
    if not files:
        raise DataError(f"{path}: no {kinds[fmt]} files found (--format {fmt})")
    if fmt == "npz":
        return _read_npz(files, layout), len(files)
    if fmt == "npy":
        groups = _npy_groups(path)
        return _read_npy(groups, layout), len(groups)
    return _read_jsonl(files, layout), _count_lines(files)


def _sample_bytes(s: Sample) -> int:
    """Approximate tar bytes of a sample: members of 512-byte blocks with a 512-byte header."""
    sizes = [128 + np.asarray(v).nbytes for k, v in s.items() if k not in ("key", "meta")]
    sizes.append(len(json.dumps(s.get("meta") or {})))
    return sum(512 + -(-n // 512) * 512 for n in sizes)


# ==== subcommands ==============================================================================
def cmd_layout(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise DataError(f"{out} already exists; choose another file or pass --overwrite")
    sizes: dict[str, int] = {}
    for text in a.modality or []:
        name, size, _ = parse_modality(text)
        if name in sizes:
            raise DataError(f"--modality {text!r}: modality {name!r} is given twice")
        sizes[name] = size
    if not sizes:
        raise DataError(
            "layout: give at least one --modality NAME=SIZE, e.g. --modality text=32000"
        )
    fixed: dict[str, int] = {}
    for text in a.fixed or []:
        name, n, _ = parse_modality(text)
        if name not in sizes:
            raise DataError(
                f"--fixed {text!r}: {name!r} is not one of the --modality names {list(sizes)}"
            )
        if n < 1:
            raise DataError(f"--fixed {text!r}: the fixed length must be >= 1")
        fixed[name] = n
    layout = VocabLayout.build(sizes, fixed_lengths=fixed)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, layout.to_dict())
    print(f"wrote {out}: {describe_layout(layout)}")
    return 0


def cmd_write(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from loretta.data.shards import write_dataset

    layout = load_layout(a.layout)
    if a.workers < 1:
        raise DataError(f"--workers={a.workers}: must be >= 1")
    samples, total = open_input(Path(a.input), a.format, layout)
    if a.samples_per_shard is not None:
        if a.samples_per_shard < 1:
            raise DataError(f"--samples-per-shard={a.samples_per_shard}: must be >= 1")
        per_shard = a.samples_per_shard
    else:
        target = parse_size(a.shard_size)
        head = list(itertools.islice(samples, 256))  # estimate bytes per sample from these
        if not head:
            raise DataError(f"{a.input}: no samples to write")
        mean = sum(map(_sample_bytes, head)) / len(head)
        per_shard = max(1, int(target // mean))
        samples = itertools.chain(head, samples)
        print(
            f"--shard-size {a.shard_size}: ~{mean / 1024:.1f} KiB per sample -> {per_shard} "
            "samples per shard",
            file=sys.stderr,
        )
    bar = tqdm(samples, total=total, unit="samples", desc="write", disable=a.quiet)
    m = write_dataset(
        bar,
        a.out,
        layout,
        samples_per_shard=per_shard,
        workers=a.workers,
        overwrite=a.overwrite,
        meta={"input": str(a.input)},
    )
    print(f"wrote {a.out}: {_totals(m)}")
    return 0


def cmd_index(a: argparse.Namespace) -> int:
    from loretta.data.shards import index_dataset

    folder = Path(a.folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of .tar shards")
    meta: dict[str, Any] = {}
    if a.layout is None:  # re-index: keep the layout and metadata of the existing manifest
        if not (folder / "manifest.json").exists():
            raise DataError(
                f"{folder} has no manifest.json to take the layout from; pass --layout "
                f"layout.json (create one with `{PROG} layout`)"
            )
        layout = load_layout(str(folder / "manifest.json"))
        with contextlib.suppress(ValueError, OSError):
            meta = dict(json.loads((folder / "manifest.json").read_text()).get("meta") or {})
    else:
        layout = load_layout(a.layout)
    m = index_dataset(folder, layout, meta=meta)
    print(f"indexed {folder}: {_totals(m)}; every array checked against the layout")
    return 0


def _totals(m: Manifest) -> str:
    toks = ", ".join(f"{k} {v:,}" for k, v in m.tokens.items())
    return f"{len(m.shards)} shards, {m.samples:,} samples, tokens: {toks}"


def _ids(arr: np.ndarray, k: int = 8) -> str:
    head = " ".join(str(int(x)) for x in arr[:k])
    return f"[{head}{' ...' if arr.size > k else ''}]"


def cmd_inspect(a: argparse.Namespace) -> int:
    p = str(a.path)
    if not is_url(p) and p.endswith(".tar") and Path(p).is_file():
        return _inspect_tar(Path(p), a.n)
    from loretta.data.shards import open_dataset

    ds = open_dataset(p, a.cache_dir)
    m = ds.manifest
    print(f"dataset  {p}  ({m.format}, {_totals(m)})")
    print(f"layout   {describe_layout(ds.layout)}")
    present = (ds.lengths > 0).mean(axis=0)
    for j, name in enumerate(ds.layout.names):
        col = ds.lengths[:, j]
        has = col[col > 0]
        mean = has.mean() if has.size else 0.0
        print(
            f"  {name:<8} in {present[j]:6.1%} of samples, {mean:8.1f} tokens on average, "
            f"max {int(col.max()):,}"
        )
    names = [s.name for s in m.shards]
    print(f"shards   {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    if m.meta:
        print(f"meta     {json.dumps(m.meta)[:200]}")
    for i in range(min(a.n, len(ds))):
        arrays = ds.read(i)
        print(f"[{i}] {ds.where(i)}")
        for name in ds.layout.names:
            if name in arrays:
                arr = arrays[name]
                print(f"    {name:<8} {arr.size:6d} tokens {arr.dtype}  {_ids(arr)}")
            else:
                print(f"    {name:<8} (absent)")
        print(f"    meta     {json.dumps(ds.meta(i))[:200]}")
    return 0


def _inspect_tar(path: Path, n: int) -> int:
    """First samples of one tar, with or without a manifest next to it."""
    import tarfile

    layout = None
    if (path.parent / "manifest.json").exists():
        layout = load_layout(str(path.parent / "manifest.json"))
        print(f"layout   {describe_layout(layout)}  (from {path.parent / 'manifest.json'})")
    samples: dict[str, list[str]] = {}
    count, last = 0, None
    try:
        with tarfile.open(path, "r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, fld = split_member(member.name)
                if key != last:  # a sample's members are consecutive in a webdataset tar
                    count, last = count + 1, key
                    if len(samples) < n:
                        samples[key] = []
                if key not in samples:
                    continue  # past the first n samples: only count them
                lines = samples[key]
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if fld.endswith(".npy"):
                    arr = parse_npy(data, f"{path}: {member.name}")
                    mod = fld[: -len(".npy")]
                    if layout is not None and mod in layout:
                        check_ids(arr, layout[mod].size, f"{path}: sample {key!r} {mod}")
                    lines.append(f"    {mod:<8} {arr.size:6d} tokens {arr.dtype}  {_ids(arr)}")
                elif fld == "json":
                    lines.append(f"    meta     {data.decode(errors='replace')[:200]}")
                else:
                    lines.append(f"    {fld:<8} {len(data)} bytes (not a token array)")
    except tarfile.TarError as e:
        raise DataError(
            f"{path}: not a readable tar ({e}); the shard is truncated or corrupt"
        ) from e
    print(f"shard    {path}: {count} samples, {path.stat().st_size:,} bytes")
    for k, (key, lines) in enumerate(samples.items()):
        print(f"[{k}] {key!r}")
        print("\n".join(lines))
    return 0


def verify_dataset(path: str, cache_dir: str = "") -> tuple[str, list[str]]:
    """Recompute checksums and compare manifest <-> shards <-> index: (summary, problems)."""
    from loretta.data.shards import _fetch, _join, resolve_local

    remote = is_url(path)
    local = resolve_local(path, cache_dir or Path.home() / ".cache/loretta/shards")
    if remote:
        try:
            _fetch(_join(path, "manifest.json"), local / "manifest.json")
        except DataError:  # a scheme only mosaicml-streaming reads (s3://, ...)
            from loretta.data.mds import _download, _streaming_remote

            _download(_streaming_remote(path), "manifest.json", local)
    elif not local.is_dir():
        raise DataError(f"dataset folder {path!r} does not exist")
    mpath = local / "manifest.json"
    try:
        d = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{mpath} not found: not a dataset folder; index existing tars with "
            f"`{PROG} index {path} --layout layout.json`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{mpath}: not valid JSON ({e}); the manifest is corrupt") from e
    if not isinstance(d, dict):
        raise DataError(f"{mpath}: expected a JSON object")
    m = Manifest.from_dict(d, str(mpath))
    from loretta.data.mds import MDS_FORMAT

    if m.format == MDS_FORMAT:
        problems = _verify_mds(path, local, m, cache_dir)
    else:
        problems = _verify_webdataset(path, local, m, remote)
    if d.get("samples", m.samples) != m.samples:
        problems.append(
            f"{mpath}: says {d['samples']} samples but its shards add up to {m.samples}"
        )
    if d.get("tokens", m.tokens) != m.tokens:
        problems.append(f"{mpath}: token totals {d['tokens']} differ from its shards' {m.tokens}")
    return f"{path}: {m.format}, {_totals(m)}", problems


def _check_file(f: Path, want_bytes: int, want_sha: str, problems: list[str]) -> bool:
    if not f.exists():
        problems.append(f"{f}: listed in the manifest but missing")
        return False
    size = f.stat().st_size
    if size != want_bytes:
        problems.append(
            f"{f}: {size} bytes but the manifest says {want_bytes} (truncated or rewritten)"
        )
    digest = sha256_file(f)
    if digest != want_sha:
        problems.append(f"{f}: sha256 {digest[:12]}... but the manifest says {want_sha[:12]}...")
        return False
    return size == want_bytes


def _check_index_file(p: Path, m: Manifest, dtype: np.dtype, problems: list[str]) -> Any:
    if not p.exists():
        problems.append(f"{p}: missing")
        return None
    digest = sha256_file(p)
    if m.index_sha256 and digest != m.index_sha256:
        problems.append(
            f"{p}: sha256 {digest[:12]}... but the manifest says {m.index_sha256[:12]}..."
        )
    try:
        index = np.load(p)
    except (ValueError, OSError) as e:
        problems.append(f"{p}: unreadable ({e})")
        return None
    if index.dtype != dtype or len(index) != m.samples:
        problems.append(
            f"{p}: {len(index)} records of {index.dtype.names}, but the manifest lists "
            f"{m.samples} samples over {m.layout.names}"
        )
        return None
    keys = index["key"]
    if len(np.unique(keys)) != len(keys):
        problems.append(f"{p}: duplicate sample keys")
    return index


def _verify_webdataset(path: str, local: Path, m: Manifest, remote: bool) -> list[str]:
    from loretta.data.shards import _fetch, _join

    problems: list[str] = []
    fix = f"; rebuild the index with `{PROG} index {path}`"
    if remote:
        _fetch(_join(path, "index.npy"), local / "index.npy")
    index = _check_index_file(local / "index.npy", m, index_dtype(len(m.layout.names)), problems)
    for sid, s in enumerate(m.shards):
        f = local / s.name
        if remote:
            try:
                _fetch(_join(path, s.name), f)
            except DataError as e:
                problems.append(str(e))
                continue
        if not _check_file(f, s.bytes, s.sha256, problems):
            continue
        try:
            idx, tokens = scan_shard(f, sid, m.layout, validate=True)
        except DataError as e:
            problems.append(str(e))
            continue
        if len(idx) != s.samples:
            problems.append(f"{f}: holds {len(idx)} samples but the manifest says {s.samples}")
        want = {k: v for k, v in s.tokens.items() if v}
        if {k: v for k, v in tokens.items() if v} != want:
            problems.append(f"{f}: holds tokens {tokens} but the manifest says {s.tokens}")
        if index is not None:
            mine = index[index["shard"] == sid]
            if len(mine) != len(idx) or not np.array_equal(mine, idx):
                bad = next(
                    (bytes(a["key"]).decode() for a, b in zip(mine, idx) if a != b), "(count)"
                )
                problems.append(
                    f"{f}: index.npy records differ from the shard's members (first at sample "
                    f"{bad!r}){fix}"
                )
    if index is not None and not np.all(np.diff(index["shard"]) >= 0):
        problems.append(f"{local / 'index.npy'}: records are not in shard order{fix}")
    if not remote:
        listed = {s.name for s in m.shards}
        for extra in sorted(p.name for p in local.glob("*.tar") if p.name not in listed):
            problems.append(
                f"{local / extra}: a shard in the folder that the manifest does not list; delete "
                f"it or include it with `{PROG} index`"
            )
    return problems


def _verify_mds(path: str, local: Path, m: Manifest, cache_dir: str) -> list[str]:
    from loretta.data.mds import (
        MDS_INDEX,
        MdsDataset,
        _download,
        _stored_name,
        _streaming_remote,
        mds_index_dtype,
    )

    problems: list[str] = []
    remote = _streaming_remote(path) if is_url(path) else None
    if remote is not None:
        for name in (MDS_INDEX, "index.json", *(s.name for s in m.shards)):
            try:
                _download(remote, name, local)
            except DataError as e:
                problems.append(str(e))
    try:
        entries = json.loads((local / "index.json").read_text())["shards"]
        theirs = [(_stored_name(e), int(e["samples"])) for e in entries]
        if theirs != [(s.name, s.samples) for s in m.shards]:
            problems.append(
                f"{local / 'index.json'}: shards {theirs[:3]}... differ from the manifest's"
            )
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{local / 'index.json'}: unreadable streaming index ({e})")
    index = _check_index_file(local / MDS_INDEX, m, mds_index_dtype(len(m.layout.names)), problems)
    for sid, s in enumerate(m.shards):
        _check_file(local / s.name, s.bytes, s.sha256, problems)
        if index is not None:
            rows = index[index["shard"] == sid]
            toks = rows["length"].sum(axis=0)
            got = {n: int(t) for n, t in zip(m.layout.names, toks) if t}
            if len(rows) != s.samples or got != {k: v for k, v in s.tokens.items() if v}:
                problems.append(
                    f"{local / MDS_INDEX}: shard {s.name} has {len(rows)} samples, tokens {got}; "
                    f"the manifest says {s.samples}, {s.tokens}"
                )
    if problems:
        return problems
    ds = MdsDataset(path, cache_dir)
    for i in range(len(ds)):  # every sample: key, lengths, shapes and ids against the index
        try:
            ds.read(i)
        except DataError as e:
            problems.append(str(e))
            if len(problems) >= 20:
                problems.append("... (stopped after 20 bad samples)")
                break
    return problems


def cmd_verify(a: argparse.Namespace) -> int:
    summary, problems = verify_dataset(str(a.path), a.cache_dir)
    if problems:
        print(f"FAILED {summary}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"OK {summary}; checksums, index and every array verified")
    return 0


def cmd_to_mds(a: argparse.Namespace) -> int:
    from loretta.data.mds import to_mds

    m = to_mds(
        a.src,
        a.dst,
        samples_per_shard=a.samples_per_shard,
        compression=a.compression,
        workers=a.workers,
        overwrite=a.overwrite,
        cache_dir=a.cache_dir,
        progress=not a.quiet,
    )
    print(f"wrote {a.dst} (MDS): {_totals(m)}")
    return 0


def cmd_from_mds(a: argparse.Namespace) -> int:
    from loretta.data.mds import from_mds

    m = from_mds(
        a.src,
        a.dst,
        samples_per_shard=a.samples_per_shard,
        workers=a.workers,
        overwrite=a.overwrite,
        cache_dir=a.cache_dir,
        progress=not a.quiet,
    )
    print(f"wrote {a.dst}: {_totals(m)}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from loretta.config import SyntheticConfig, SynthModality
    from loretta.configlib import to_dict
    from loretta.data.shards import write_dataset
    from loretta.data.synthetic import synthetic_layout, synthetic_samples

    mods: dict[str, SynthModality] = {}
    for text in a.modality or []:
        name, size, (lo, hi) = parse_modality(text, with_lengths=True)
        lo, hi = (lo, hi) if hi else (a.min_len, a.max_len)
        if name in mods:
            raise DataError(f"--modality {text!r}: modality {name!r} is given twice")
        if size < 1 or not 1 <= lo <= hi:
            raise DataError(f"--modality {text!r}: need size >= 1 and 1 <= min <= max tokens")
        mods[name] = SynthModality(size=size, min_len=lo, max_len=hi)
    if not mods:
        raise DataError("synth: give at least one --modality NAME=SIZE[:MIN-MAX], e.g. a=64:8-32")
    for flag, v in (
        ("--samples", a.samples),
        ("--classes", a.classes),
        ("--samples-per-shard", a.samples_per_shard),
        ("--workers", a.workers),
    ):
        if v < 1:
            raise DataError(f"{flag}={v}: must be >= 1")
    cfg = SyntheticConfig(
        samples=a.samples,
        classes=a.classes,
        seed=a.seed,
        modalities=mods,
        samples_per_shard=a.samples_per_shard,
    )
    m = write_dataset(
        synthetic_samples(cfg),
        a.out,
        synthetic_layout(cfg),
        cfg.samples_per_shard,
        workers=a.workers,
        overwrite=a.overwrite,
        meta={"synthetic": to_dict(cfg)},  # what ensure_synthetic compares against
        progress=not a.quiet,
    )
    print(f"wrote {a.out}: {_totals(m)}")
    return 0


# ==== entry point ==============================================================================
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Create, inspect, verify and convert loretta datasets (webdataset tars "
        "with manifest.json + index.npy, or MDS).",
        epilog="Exit codes: 0 done, 1 verify found problems, 2 bad input. See docs/data.md.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = add("layout", cmd_layout, "create a vocabulary layout file (layout.json)")
    p.add_argument("out", help="the layout file to write, e.g. layout.json")
    p.add_argument(
        "--modality",
        action="append",
        metavar="NAME=SIZE",
        help="a modality and its number of ids (repeat; order = id order)",
    )
    p.add_argument(
        "--fixed",
        action="append",
        metavar="NAME=LENGTH",
        help="a modality whose samples all have this many tokens",
    )
    p.add_argument("--overwrite", action="store_true")

    p = add("write", cmd_write, "write pre-tokenized samples (.npz / .npy / JSON lines) as shards")
    p.add_argument("input", help="a folder of .npz or {key}.{modality}.npy files, or JSON lines")
    p.add_argument("out", help="the dataset folder to create")
    p.add_argument(
        "--layout",
        required=True,
        help="layout.json (or a dataset folder / manifest.json to copy it from)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default="64MB", help="target shard size (default 64MB)")
    size.add_argument("--samples-per-shard", type=int, help="exact samples per shard instead")
    p.add_argument("--format", default="auto", choices=["auto", "npz", "npy", "jsonl"])
    p.add_argument("--workers", type=int, default=1, help="processes encoding shards")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("index", cmd_index, "write manifest.json + index.npy for existing webdataset tars")
    p.add_argument("folder")
    p.add_argument(
        "--layout", help="layout.json (default: the layout of the folder's existing manifest)"
    )

    p = add("inspect", cmd_inspect, "print the manifest summary and the first samples")
    p.add_argument("path", help="a dataset folder or URL (webdataset or MDS), or one .tar shard")
    p.add_argument("-n", type=int, default=3, help="samples to print (default 3)")
    p.add_argument("--cache-dir", default="", help="local copies of remote files")

    p = add("verify", cmd_verify, "recompute checksums; compare manifest, shards and index")
    p.add_argument("path", help="a dataset folder or URL (webdataset or MDS)")
    p.add_argument("--cache-dir", default="", help="local copies of remote files")

    for name, fn, what in (
        ("to-mds", cmd_to_mds, "convert a webdataset dataset to MDS (mosaicml-streaming)"),
        ("from-mds", cmd_from_mds, "convert an MDS dataset back to webdataset shards"),
    ):
        p = add(name, fn, what)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--samples-per-shard", type=int, help="default: keep the source's shards")
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--cache-dir", default="", help="local copies of remote files")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "to-mds":
            p.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")

    p = add("synth", cmd_synth, "write the synthetic class-conditioned dataset (tests, demos)")
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument(
        "--modality",
        action="append",
        metavar="NAME=SIZE[:MIN-MAX]",
        help="e.g. a=64 or a=64:8-32 (repeat)",
    )
    p.add_argument("--min-len", type=int, default=8, help="default min tokens per modality")
    p.add_argument("--max-len", type=int, default=32, help="default max tokens per modality")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `loretta-shards inspect ... | head`
        return 0
    except (LorettaError, OSError) as e:
        print(f"{PROG} {args.cmd}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
