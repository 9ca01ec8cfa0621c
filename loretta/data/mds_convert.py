"""Converting datasets between our webdataset format and MDS (mosaicml-streaming), and adopting
MDS folders written by a plain `MDSWriter` (see loretta/data/mds.py for the MDS layout).

    to_mds(src, dst)            our tars -> MDS (one MDS shard per tar: the same batches)
    from_mds(src, dst)          MDS -> our tars (lossless)
    adopt_mds(folder, layout)   a plain MDSWriter folder -> readable by loretta, in place
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loretta.data.format import (
    KEY_BYTES,
    Manifest,
    ShardInfo,
    atomic_write_bytes,
    atomic_write_json,
    check_ids,
    npy_bytes,
    progress_bar,
    replace_dir,
    sha256_file,
    token_dtype,
)
from loretta.data.mds import (
    MDS_FORMAT,
    MDS_INDEX,
    SHARD_LIMIT,
    MdsDataset,
    ids_crc,
    local_streaming,
    mds_columns,
    mds_index_dtype,
    stored_name,
    streaming_shards,
)
from loretta.data.shards import Sample, ShardDataset, write_dataset
from loretta.errors import DataError
from loretta.vocab import VocabLayout


# ==== webdataset -> MDS ========================================================================
def _mds_record(ds: ShardDataset, i: int) -> dict[str, Any]:
    arrays = ds.read(i)
    rec: dict[str, Any] = {
        "key": ds.key(i),
        "meta": ds.meta(i),
        "lengths": np.asarray(ds.lengths[i], dtype=np.int32),
    }
    for m in ds.layout.modalities:
        dt = token_dtype(m.size)
        a = arrays.get(m.name)
        rec[m.name] = a.astype(dt) if a is not None else np.zeros(1, dt)  # placeholder: absent
    return rec


Part = tuple[str, int, int, str | None]  # (output folder, first sample, stop, compression)
_SOURCE: ShardDataset | None = None  # the source dataset, in a to_mds worker process


def _open_source(src: str, cache_dir: str) -> None:
    global _SOURCE
    _SOURCE = ShardDataset(src, cache_dir)


def _write_part_in_worker(part: Part) -> list[dict[str, Any]]:
    assert _SOURCE is not None, "pool initializer did not run"
    return _write_part(_SOURCE, part)


def _source_crcs(ds: ShardDataset) -> np.ndarray:
    """ids_crc of every sample's modalities as `_mds_record` stores them: (n, M)."""
    out = np.zeros(ds.lengths.shape, np.uint32)
    dts = [token_dtype(m.size) for m in ds.layout.modalities]
    for i in range(len(ds)):
        key = bytes(ds.index[i]["key"])
        for name, a in ds.read(i).items():
            j = ds.layout.names.index(name)
            out[i, j] = ids_crc(key, a.astype(dts[j], copy=False))
    return out


def _write_part(ds: ShardDataset, part: Part) -> list[dict[str, Any]]:
    """Write source samples [start, stop) as MDS into `out`; return its index.json shards."""
    out, start, stop, compression = part
    from streaming import MDSWriter

    with MDSWriter(
        out=out, columns=mds_columns(ds.layout), compression=compression, size_limit=SHARD_LIMIT
    ) as w:
        for i in range(start, stop):
            w.write(_mds_record(ds, i))
    return list(json.loads((Path(out) / "index.json").read_text())["shards"])


def _move_shard(part: Path, root: Path, entry: dict[str, Any], sid: int) -> dict[str, Any]:
    """Move a part's shard file(s) to root/shard.{sid}.mds[.zip] and rename them in the entry."""
    entry = dict(entry)
    for kind in ("raw_data", "zip_data"):
        info = entry.get(kind)
        if not info:
            continue
        old = str(info["basename"])
        rest = old.split(".", 2)[2]  # 'shard.00000.mds.zstd' -> 'mds.zstd'
        new = f"shard.{sid:05d}.{rest}"
        if (part / old).exists():
            os.replace(part / old, root / new)
        entry[kind] = {**info, "basename": new}
    return entry


def to_mds(
    src: str | Path,
    dst: str | Path,
    *,
    samples_per_shard: int | None = None,
    compression: str | None = None,
    workers: int = 1,
    overwrite: bool = False,
    cache_dir: str | Path = "",
    progress: bool = False,
) -> Manifest:
    """Convert one of our webdataset datasets (folder or URL) to an MDS folder at `dst`.

    By default every source tar becomes one MDS shard (same shard sizes, hence the same batches
    from the loader); `samples_per_shard` regroups. Written in a temp folder next to `dst` and
    renamed into place when complete; `workers` processes write shards in parallel.
    """
    src_s = str(src)
    ds = ShardDataset(src_s, cache_dir)
    layout = ds.layout
    mds_columns(layout)  # refuse clashing modality names before any work
    out = Path(dst)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another folder or pass --overwrite")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise DataError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    if compression is not None:
        from streaming.base.compression import get_compressions, is_compression

        if not is_compression(compression):
            known = sorted({c.split(":")[0] for c in get_compressions()})
            raise DataError(
                f"compression={compression!r}: streaming compresses with {known} (optionally "
                "with a level, e.g. zstd:7)"
            )
    n = len(ds)
    if samples_per_shard is None:
        cuts = np.concatenate([[0], np.cumsum(ds.shard_counts)]).tolist()
    else:
        cuts = [*range(0, n, samples_per_shard), n]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    parts = [tmp / f".part-{p:06d}" for p in range(len(cuts) - 1)]
    tasks: list[Part] = [
        (str(parts[p]), int(cuts[p]), int(cuts[p + 1]), compression) for p in range(len(parts))
    ]
    bar = progress_bar(progress, "shards")
    try:
        entries: list[dict[str, Any]] = []
        with contextlib.ExitStack() as stack:
            if workers > 1:
                pool = stack.enter_context(
                    mp.get_context("spawn").Pool(workers, _open_source, (src_s, str(cache_dir)))
                )
                results: Iterator[list[dict[str, Any]]] = pool.imap(_write_part_in_worker, tasks)
            else:
                results = (_write_part(ds, t) for t in tasks)
            for part, shards in zip(parts, results):
                entries += [
                    _move_shard(part, tmp, e, len(entries) + k) for k, e in enumerate(shards)
                ]
                shutil.rmtree(part)
                if bar is not None:
                    bar.update(1)
        (tmp / "index.json").write_text(json.dumps({"version": 2, "shards": entries}, indent=1))
        counts = [int(e["samples"]) for e in entries]
        index = np.zeros(n, dtype=mds_index_dtype(len(layout.names)))
        index["shard"] = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        index["key"] = ds.index["key"]
        index["length"] = ds.lengths
        index["crc"] = _source_crcs(ds)
        atomic_write_bytes(tmp / MDS_INDEX, npy_bytes(index))
        starts = np.concatenate([[0], np.cumsum(counts)])
        infos = []
        for sid, e in enumerate(entries):
            f = tmp / stored_name(e)
            toks = ds.lengths[starts[sid] : starts[sid + 1]].sum(axis=0)
            infos.append(
                ShardInfo(
                    f.name,
                    counts[sid],
                    f.stat().st_size,
                    sha256_file(f),
                    {m: int(t) for m, t in zip(layout.names, toks)},
                )
            )
        manifest = Manifest(
            layout, infos, sha256_file(tmp / MDS_INDEX), format=MDS_FORMAT, meta=ds.manifest.meta
        )
        d = manifest.to_dict()
        d["index"]["file"] = MDS_INDEX
        d["converted_from"] = src_s
        atomic_write_json(tmp / "manifest.json", d)
        if out.exists() and not overwrite:
            raise DataError(f"{out} appeared while writing; not replacing it")
        replace_dir(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ds.close()
        if bar is not None:
            bar.close()


# ==== MDS -> webdataset ========================================================================
def from_mds(
    src: str | Path,
    dst: str | Path,
    *,
    samples_per_shard: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    cache_dir: str | Path = "",
    progress: bool = False,
) -> Manifest:
    """Convert an MDS dataset written by `to_mds` back to our webdataset format (lossless: the
    same keys, arrays, dtypes and metadata; shards of `samples_per_shard`, by default the size
    of the largest MDS shard, which restores the original tars of a `to_mds` round trip)."""
    ds = MdsDataset(str(src), cache_dir)

    def samples() -> Iterator[Sample]:
        for i in range(len(ds)):
            s = ds.sample(i)
            arrays = ds.read(i, sample=s)
            yield {"key": ds.key(i), **arrays, "meta": s.get("meta") or {}}

    return write_dataset(
        samples(),
        dst,
        ds.layout,
        samples_per_shard=samples_per_shard or max(ds.shard_counts),
        workers=workers,
        overwrite=overwrite,
        meta=ds.manifest.meta,
        progress=progress,
    )


# ==== plain MDSWriter folders ==================================================================
def adopt_mds(
    folder: str | Path,
    layout: VocabLayout,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> Manifest:
    """Make an MDS folder written by a plain `MDSWriter` readable by loretta, in place: check
    every sample against `layout` and write manifest.json + loretta_index.npy next to it.

    Columns: one ``ndarray`` column per modality (named as in the layout; a modality without a
    column is absent from every sample), and optionally ``key`` (str; default: the sample's
    index), ``meta`` (json) and ``lengths`` (tokens per modality in layout order, 0 = absent,
    as `to_mds` writes it). The shard files are not modified.
    """
    folder = Path(folder)
    p = folder / "index.json"
    entries = streaming_shards(p)
    columns = _adoptable_columns(p, entries, layout)
    names = layout.names
    counts = [int(e["samples"]) for e in entries]
    index = np.zeros(sum(counts), dtype=mds_index_dtype(len(names)))
    index["shard"] = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    sd = local_streaming(folder, str(folder))
    if int(sd.num_samples) != len(index):
        raise DataError(f"{p}: lists {len(index)} samples but streaming reads {sd.num_samples}")
    seen: set[str] = set()
    bar = progress_bar(progress, "samples")
    try:
        for i in range(len(index)):
            key, lengths, crcs = _adopt_sample(sd, i, columns, layout, f"{folder} sample {i}")
            if key in seen:
                raise DataError(f"{folder} sample {i}: key {key!r} appears twice; keys are unique")
            seen.add(key)
            index[i]["key"], index[i]["length"], index[i]["crc"] = key.encode(), lengths, crcs
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    starts = np.concatenate([[0], np.cumsum(counts)])
    infos = []
    for sid, e in enumerate(entries):
        f = folder / stored_name(e)
        if not f.exists():
            raise DataError(f"{f}: listed in {p} but missing; restore it")
        toks = index["length"][starts[sid] : starts[sid + 1]].sum(axis=0)
        tokens = {m: int(t) for m, t in zip(names, toks)}
        infos.append(ShardInfo(f.name, counts[sid], f.stat().st_size, sha256_file(f), tokens))
    atomic_write_bytes(folder / MDS_INDEX, npy_bytes(index))
    info = {"columns": columns, "key": "key column" if "key" in columns else "sample index"}
    manifest = Manifest(
        layout,
        infos,
        sha256_file(folder / MDS_INDEX),
        format=MDS_FORMAT,
        meta={**(meta or {}), "adopted_mds": info},
    )
    d = manifest.to_dict()
    d["index"]["file"] = MDS_INDEX
    atomic_write_json(folder / "manifest.json", d)
    return manifest


def _adoptable_columns(
    p: Path, entries: list[dict[str, Any]], layout: VocabLayout
) -> dict[str, str]:
    """{column: encoding}, the same in every shard and each one loretta knows how to read."""
    cols = [dict(zip(e.get("column_names", ()), e.get("column_encodings", ()))) for e in entries]
    if any(c != cols[0] for c in cols):
        raise DataError(f"{p}: shards have different columns; write the folder with one MDSWriter")
    columns = cols[0]
    want = {"key": "str", "meta": "json"}
    for name, enc in columns.items():
        if name in layout or name == "lengths":
            ok = str(enc).startswith("ndarray")
        else:
            ok = want.get(name) == enc
        if not ok:
            raise DataError(
                f"{p}: column {name!r} ({enc}) is not one loretta reads: one ndarray column per "
                f"modality of the layout {layout.names}, plus optional key (str), meta (json) "
                f"and lengths (ndarray); add {name!r} to the layout, or rewrite the folder "
                "without it"
            )
    if not any(n in layout for n in columns):
        raise DataError(
            f"{p}: no column is a modality of the layout {layout.names} (columns: "
            f"{list(columns)}); name the layout's modalities after the ndarray columns"
        )
    return columns


def _adopt_sample(
    sd: Any, i: int, columns: dict[str, str], layout: VocabLayout, where: str
) -> tuple[str, list[int], list[int]]:
    """(key, tokens per modality, ids_crc per modality) of sample i, every array checked
    against the layout."""
    try:
        s = sd.get_item(i)
    except Exception as e:
        raise DataError(f"{where}: unreadable ({type(e).__name__}: {e})") from e
    key = s["key"] if "key" in columns else f"{i:012d}"
    if not isinstance(key, str) or not key or "." in key or len(key.encode()) > KEY_BYTES:
        raise DataError(
            f"{where}: key {key!r} must be 1..{KEY_BYTES} bytes without '.'; rewrite the key column"
        )
    if "meta" in columns and not isinstance(s["meta"], dict):
        raise DataError(f"{where}: meta holds {type(s['meta']).__name__}, not a JSON object")
    given = None
    if "lengths" in columns:
        given = np.asarray(s["lengths"]).tolist()
        if len(given) != len(layout.names):
            raise DataError(
                f"{where}: lengths {given} has {len(given)} entries; the layout has "
                f"{len(layout.names)} modalities {layout.names}"
            )
    lengths, crcs = [], []
    for j, m in enumerate(layout.modalities):
        if m.name not in columns or (given is not None and given[j] == 0):
            lengths.append(0)  # absent (or to_mds's placeholder)
            crcs.append(0)
            continue
        arr = s[m.name]
        check_ids(np.asarray(arr), m.size, f"{where} ({key!r}) {m.name}")
        if given is not None and arr.size != given[j]:
            raise DataError(
                f"{where} ({key!r}): {m.name} has {arr.size} tokens but lengths says {given[j]}"
            )
        if m.fixed_length is not None and arr.size not in (0, m.fixed_length):
            raise DataError(
                f"{where} ({key!r}): {m.name} has {arr.size} tokens but the layout fixes it at "
                f"{m.fixed_length}; fix the data or the layout"
            )
        lengths.append(int(arr.size))
        crcs.append(ids_crc(key, arr))
    if not any(lengths):
        raise DataError(f"{where} ({key!r}): no tokens in any modality of the layout")
    return key, lengths, crcs
