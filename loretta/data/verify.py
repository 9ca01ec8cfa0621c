"""`loretta-shards verify`: recompute every checksum and compare manifest, shards and index,
record by record, for both backends (local folders or URLs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from loretta.data.format import Manifest, index_dtype, read_manifest, scan_shard, sha256_file
from loretta.data.mds import (
    MDS_FORMAT,
    MDS_INDEX,
    MdsDataset,
    mds_index_dtype,
    stored_name,
)
from loretta.data.remote import (
    cache_folder,
    cache_path,
    fetch,
    is_url,
    streaming_fetch,
    streaming_remote,
)
from loretta.errors import DataError

PROG = "loretta-shards"


def verify_dataset(path: str, cache_dir: str = "") -> tuple[str, list[str]]:
    """Recompute checksums and compare manifest <-> shards <-> index: (summary, problems)."""
    remote = is_url(path)
    local = cache_folder(path, cache_dir)
    if remote:
        try:
            fetch(path, "manifest.json", local)
        except DataError:  # a scheme only mosaicml-streaming reads (s3://, ...)
            streaming_fetch(streaming_remote(path), "manifest.json", local)
    elif not local.is_dir():
        raise DataError(f"dataset folder {path!r} does not exist")
    mpath = local / "manifest.json"
    m = read_manifest(mpath)
    d = json.loads(mpath.read_text())  # the totals as written, to compare with the shards'
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
    return f"{path}: {m.format}, {m.summary()}", problems


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
    problems: list[str] = []
    fix = f"; rebuild the index with `{PROG} index {path}`"
    if remote:
        fetch(path, "index.npy", local)
    index = _check_index_file(local / "index.npy", m, index_dtype(len(m.layout.names)), problems)
    for sid, s in enumerate(m.shards):
        f = cache_path(local, s.name, "shard name")
        if remote:
            try:
                fetch(path, s.name, local, where="shard name")
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
    problems: list[str] = []
    remote = streaming_remote(path) if is_url(path) else None
    if remote is not None:
        for name in (MDS_INDEX, "index.json", *(s.name for s in m.shards)):
            try:
                streaming_fetch(remote, name, local)
            except DataError as e:
                problems.append(str(e))
    try:
        entries = json.loads((local / "index.json").read_text())["shards"]
        theirs = [(stored_name(e), int(e["samples"])) for e in entries]
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
