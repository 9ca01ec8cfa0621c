"""Writing and reading datasets of webdataset tar shards (see loretta/data/format.py).

Writing: `DatasetWriter` (or `write_dataset` for parallel writing) builds every shard, the index
and the manifest inside a temporary folder and renames it into place when complete, so a crash
never leaves a half-written dataset.

Indexing: `index_dataset` writes the manifest and index for tars written by other tools; a
compressed tar (.tar.gz, .tgz) is first decompressed into a plain tar next to it.

Reading: `ShardDataset` opens a dataset from a local folder or a URL (loretta/data/remote.py:
https://, file://, pipe:PROGRAM ARGS {}, fsspec schemes). Remote shards are copied into a local
cache (atomically) on first use. Samples are read by global index through memory-mapped shards.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import multiprocessing as mp
import os
import shutil
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loretta.data.format import (
    FORMAT,
    Manifest,
    ShardInfo,
    atomic_write_bytes,
    atomic_write_json,
    check_ids,
    index_dtype,
    index_dtype_v1,
    load_index,
    member_crc,
    npy_bytes,
    parse_npy,
    progress_bar,
    read_manifest,
    replace_dir,
    scan_shard,
    sha256_file,
    token_dtype,
)
from loretta.data.remote import FetchOptions, cache_folder, cache_path, fetch, is_url
from loretta.errors import DataError
from loretta.vocab import VocabLayout

Sample = dict[str, Any]  # {"key": str, <modality>: 1-D local ids, "meta": dict (optional)}


# ==== writing ==================================================================================
def _encode_sample(sample: Sample, layout: VocabLayout, where: str) -> dict[str, Any]:
    key = sample.get("key")
    if not isinstance(key, str) or not key or "." in key:
        raise DataError(f"{where}: sample key {key!r} must be a non-empty string without '.'")
    out: dict[str, Any] = {"__key__": key}
    n_mod = 0
    for name, value in sample.items():
        if name in ("key", "meta"):
            continue
        if name not in layout:
            raise DataError(
                f"{where}: sample {key!r} has field {name!r}, which is not a modality of the "
                f"layout {layout.names}; add it to the layout or drop the field"
            )
        arr = np.asarray(value)
        check_ids(arr, layout[name].size, f"{where}: sample {key!r} {name}")
        out[f"{name}.npy"] = npy_bytes(arr.astype(token_dtype(layout[name].size), copy=False))
        n_mod += 1
    if n_mod == 0:
        raise DataError(f"{where}: sample {key!r} has no modality arrays")
    out["json"] = json.dumps(sample.get("meta") or {}).encode()
    return out


def _write_shard(path: Path, encoded: list[dict[str, Any]]) -> None:
    import webdataset as wds

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=0) as tw:
            for rec in encoded:
                tw.write(rec)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard_task(args: tuple[str, int, list[Sample], dict[str, Any]]) -> tuple[Any, ...]:
    folder, shard_id, samples, layout_d = args
    layout = VocabLayout.from_dict(layout_d)
    path = Path(folder) / f"shard-{shard_id:06d}.tar"
    _write_shard(path, [_encode_sample(s, layout, str(path)) for s in samples])
    return _finish_shard(path, shard_id, layout)


def _finish_shard(path: Path, shard_id: int, layout: VocabLayout) -> tuple[Any, ...]:
    idx, tokens = scan_shard(path, shard_id, layout, validate=False)
    info = ShardInfo(path.name, len(idx), path.stat().st_size, sha256_file(path), tokens)
    return info, idx


class DatasetWriter:
    """Sequential writer with a target shard size.

    with DatasetWriter("data/pairs", layout) as w:
        for s in samples:
            w.write(s)          # {"key": "000001", "image": ids, "text": ids, "meta": {...}}
    """

    def __init__(
        self,
        out_dir: str | Path,
        layout: VocabLayout,
        shard_bytes: int = 64 << 20,
        samples_per_shard: int | None = None,
        overwrite: bool = False,
        meta: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        self.out = Path(out_dir)
        if self.out.exists() and not overwrite:
            raise DataError(
                f"{self.out} already exists; choose another folder or pass overwrite=True "
                "(--overwrite) to replace it"
            )
        self.layout, self.meta = layout, dict(meta or {})
        self.shard_bytes, self.samples_per_shard = shard_bytes, samples_per_shard
        self.overwrite = overwrite
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir()
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._keys: set[str] = set()
        self._infos: list[ShardInfo] = []
        self._indices: list[np.ndarray] = []
        self._bar = progress_bar(progress, "samples")

    def write(self, sample: Sample) -> None:
        rec = _encode_sample(sample, self.layout, str(self.out))
        if rec["__key__"] in self._keys:
            raise DataError(
                f"{self.out}: duplicate sample key {rec['__key__']!r}; keys must be unique"
            )
        self._keys.add(rec["__key__"])
        self._pending.append(rec)
        self._pending_bytes += sum(len(v) + 512 for k, v in rec.items() if k != "__key__")
        if self._bar is not None:
            self._bar.update(1)
        full = self.samples_per_shard is not None and len(self._pending) >= self.samples_per_shard
        if full or (self.samples_per_shard is None and self._pending_bytes >= self.shard_bytes):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        sid = len(self._infos)
        path = self.tmp / f"shard-{sid:06d}.tar"
        _write_shard(path, self._pending)
        info, idx = _finish_shard(path, sid, self.layout)
        self._infos.append(info)
        self._indices.append(idx)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> Manifest:
        self._flush()
        if self._bar is not None:
            self._bar.close()
        return _commit(
            self.tmp, self.out, self.layout, self._infos, self._indices, self.meta, self.overwrite
        )

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _commit(
    tmp: Path,
    out: Path,
    layout: VocabLayout,
    infos: list[ShardInfo],
    indices: list[np.ndarray],
    meta: dict[str, Any],
    overwrite: bool,
) -> Manifest:
    """Write index + manifest into `tmp`, then move `tmp` to `out` in one rename."""
    if not infos:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out}: no samples were written; an empty dataset is not created")
    index = np.concatenate(indices) if indices else np.zeros(0, index_dtype(len(layout.names)))
    keys = index["key"]
    if len(np.unique(keys)) != len(keys):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out}: duplicate sample keys across shards; keys must be unique")
    np.save(tmp / "index.npy", index)
    manifest = Manifest(layout, infos, sha256_file(tmp / "index.npy"), meta=meta)
    atomic_write_json(tmp / "manifest.json", manifest.to_dict())
    if out.exists() and not overwrite:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out} appeared while writing; not replacing it")
    replace_dir(tmp, out)
    return manifest


def write_dataset(
    samples: Iterable[Sample],
    out_dir: str | Path,
    layout: VocabLayout,
    samples_per_shard: int = 1000,
    workers: int = 1,
    overwrite: bool = False,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> Manifest:
    """Write `samples` into shards of `samples_per_shard`, encoding shards in `workers` processes."""
    if workers <= 1:
        with DatasetWriter(
            out_dir,
            layout,
            samples_per_shard=samples_per_shard,
            overwrite=overwrite,
            meta=meta,
            progress=progress,
        ) as w:
            for s in samples:
                w.write(s)
        return read_manifest(Path(out_dir) / "manifest.json")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    bar = progress_bar(progress, "shards")

    def tasks() -> Iterator[tuple[str, int, list[Sample], dict[str, Any]]]:
        chunk: list[Sample] = []
        sid = 0
        for s in samples:
            chunk.append(s)
            if len(chunk) == samples_per_shard:
                yield str(tmp), sid, chunk, layout.to_dict()
                chunk, sid = [], sid + 1
        if chunk:
            yield str(tmp), sid, chunk, layout.to_dict()

    infos, indices = [], []
    try:
        with mp.get_context("spawn").Pool(workers) as pool:
            for info, idx in pool.imap(_write_shard_task, tasks()):
                infos.append(info)
                indices.append(idx)
                if bar is not None:
                    bar.update(1)
        return _commit(tmp, out, layout, infos, indices, dict(meta or {}), overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()


COMPRESSED_TARS = (".tar.gz", ".tgz")


def index_dataset(
    folder: str | Path, layout: VocabLayout, meta: dict[str, Any] | None = None
) -> Manifest:
    """Build manifest + index for existing webdataset tars in `folder` (validating every array).

    A member is read by its byte offset, which a gzip stream does not have: each compressed tar
    (NAME.tar.gz or NAME.tgz) is decompressed into NAME.tar in the folder (temp file, then
    rename; the compressed file is kept) and the plain tar is indexed. A NAME.tar at least as
    new as its compressed file is reused, so re-indexing does not decompress again."""
    folder = Path(folder)
    decompressed = [decompress_tar(p) for p in _compressed_tars(folder)]
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise DataError(f"{folder}: no .tar, .tar.gz or .tgz shards found")
    infos, indices = [], []
    for sid, path in enumerate(tars):
        idx, tokens = scan_shard(path, sid, layout, validate=True)
        infos.append(ShardInfo(path.name, len(idx), path.stat().st_size, sha256_file(path), tokens))
        indices.append(idx)
    index = np.concatenate(indices)
    atomic_write_bytes(folder / "index.npy", npy_bytes(index))
    meta = dict(meta or {})
    if decompressed:
        meta["decompressed"] = {t.name: c.name for c, t in decompressed}
    manifest = Manifest(layout, infos, sha256_file(folder / "index.npy"), meta=meta)
    atomic_write_json(folder / "manifest.json", manifest.to_dict())
    return manifest


def _compressed_tars(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(COMPRESSED_TARS))


def decompress_tar(src: Path) -> tuple[Path, Path]:
    """NAME.tar.gz -> NAME.tar beside it, atomically; (src, plain tar)."""
    stem = src.name[: -len(next(e for e in COMPRESSED_TARS if src.name.endswith(e)))]
    dst = src.with_name(f"{stem}.tar")
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return src, dst
    import gzip
    import zlib

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        with gzip.open(src, "rb") as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{src}: cannot decompress ({type(e).__name__}: {e}); the file is truncated or not "
            "gzip: re-download it"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    return src, dst


# ==== reading ==================================================================================
class ShardDataset:
    """Random access to the samples of one dataset by global index (0..n-1)."""

    def __init__(
        self,
        path: str,
        cache_dir: str | Path = "",
        verify_checksums: bool = False,
        max_open: int = 64,
        verify_samples: bool = True,
        fetch_options: FetchOptions | None = None,
    ) -> None:
        """`verify_checksums`: also check each shard's sha256 when it is first opened.
        `verify_samples` (default on; off only to measure its cost): check every member read
        against its CRC32 in the index. `fetch_options`: retries, timeout and cache limit of a
        URL dataset's downloads."""
        self.path = path
        self.remote = is_url(path)
        self.local = cache_folder(path, cache_dir)
        self.fetch_options = fetch_options
        if self.remote:
            fetch(path, "manifest.json", self.local, opts=fetch_options)
            fetch(path, "index.npy", self.local, opts=fetch_options)
        elif not self.local.is_dir():
            raise DataError(f"dataset folder {path!r} does not exist")
        self.manifest = read_manifest(self.local / "manifest.json")
        if self.manifest.format != FORMAT:
            raise DataError(
                f"{path}: a {self.manifest.format!r} dataset, not webdataset tars "
                f"({FORMAT!r}); open it with loretta.data.sources.open_dataset"
            )
        self.layout = self.manifest.layout
        self.verify_checksums, self.verify_samples = verify_checksums, verify_samples
        self._check_index()
        self.lengths = np.ascontiguousarray(self.index["length"])  # (n, M) tokens per modality
        self.shard_counts = [s.samples for s in self.manifest.shards]
        self._open: OrderedDict[int, tuple[Any, mmap.mmap]] = OrderedDict()
        self._verified: set[int] = set()
        self._pid = os.getpid()
        self._max_open = max_open
        if not self.remote:
            self._check_shard_files()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def modality_names(self) -> list[str]:
        return self.layout.names

    def _check_index(self) -> None:
        fix = f"`loretta-shards index {self.path}`"
        M = len(self.layout.names)
        path = self.local / "index.npy"
        old = (index_dtype_v1(M),)
        self.index = load_index(path, index_dtype(M), self.manifest, self.path, fix, old)
        # every member the index points at lies inside its shard (sizes from the manifest)
        size = np.array([s.bytes for s in self.manifest.shards], np.int64)[self.index["shard"]]
        off, nb, n = self.index["offset"], self.index["nbytes"], self.index["length"]
        bad = (n > 0) & ((nb <= 0) | (off < 0) | (off + nb > size[:, None]))
        m_off, m_nb = self.index["meta_offset"], self.index["meta_nbytes"]
        bad_meta = (m_nb < 0) | ((m_nb > 0) & ((m_off < 0) | (m_off + m_nb > size)))
        bad_row = bad.any(axis=1) | bad_meta
        if bad_row.any():
            k = int(np.flatnonzero(bad_row)[0])
            raise DataError(
                f"{path}: record {k} ({self.key(k)!r}) points outside its shard "
                f"{self.manifest.shards[int(self.index['shard'][k])].name} (offsets "
                f"{off[k].tolist()}, sizes {nb[k].tolist()}); rebuild it with {fix}"
            )

    def _check_shard_files(self) -> None:
        for s in self.manifest.shards:
            f = self.local / s.name
            if not f.exists():
                raise DataError(
                    f"{f}: shard listed in the manifest is missing; restore it or rebuild the "
                    "manifest with `loretta-shards index`"
                )
            size = f.stat().st_size
            if size != s.bytes:
                raise DataError(
                    f"{f}: {size} bytes but the manifest says {s.bytes}; the shard is truncated "
                    "or was rewritten: restore it or rebuild with `loretta-shards index`"
                )

    def _shard_map(self, sid: int) -> mmap.mmap:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: reopen our own maps
            self._open.clear()
            self._pid = os.getpid()
        hit = self._open.get(sid)
        if hit is not None:
            self._open.move_to_end(sid)
            return hit[1]
        info = self.manifest.shards[sid]
        f_path = cache_path(self.local, info.name, "shard name")
        if self.remote:
            fetch(self.path, info.name, self.local, where="shard name", opts=self.fetch_options)
        if self.verify_checksums and sid not in self._verified:
            digest = sha256_file(f_path)
            if digest != info.sha256:
                raise DataError(
                    f"{f_path}: sha256 {digest[:12]}... differs from the manifest's "
                    f"{info.sha256[:12]}...; the shard is corrupt or was replaced"
                )
            self._verified.add(sid)
        fh = open(f_path, "rb")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._open[sid] = (fh, mm)
        while len(self._open) > self._max_open:
            _, (old_fh, old_mm) = self._open.popitem(last=False)
            with contextlib.suppress(BufferError):
                old_mm.close()
            old_fh.close()
        return mm

    def key(self, i: int) -> str:
        return bytes(self.index[i]["key"]).decode()

    def where(self, i: int) -> str:
        sid = int(self.index[i]["shard"])
        return f"{self.path}/{self.manifest.shards[sid].name} sample {self.key(i)!r}"

    def read(self, i: int, modalities: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Local-id arrays of sample `i` (views into the mapped shard: copy before keeping)."""
        rec = self.index[i]
        mm = self._shard_map(int(rec["shard"]))
        view = memoryview(mm)
        out = {}
        names = self.layout.names
        # the key-seeded CRC32 of each member (format.member_crc), read once per sample
        seed, crcs = (
            (zlib.crc32(rec["key"]), rec["crc"].tolist()) if self.verify_samples else (0, [])
        )
        wanted = names if modalities is None else modalities
        for name in wanted:
            j = names.index(name)
            n = int(rec["length"][j])
            if n == 0:
                continue
            off, nb = int(rec["offset"][j]), int(rec["nbytes"][j])
            try:  # messages name the file and sample; formatted only when there is one
                if off + nb > len(mm):
                    raise DataError(
                        f": member {name}.npy needs bytes up to {off + nb} but the shard has "
                        f"{len(mm)}; the shard is truncated"
                    )
                member = view[off : off + nb]
                if self.verify_samples and zlib.crc32(member, seed) != crcs[j]:
                    raise DataError(
                        f" {name}.npy: bytes differ from their CRC32 in index.npy; the shard "
                        "is corrupt: restore it (check with `loretta-shards verify`)"
                    )
                arr = parse_npy(member, f" {name}.npy")
                if arr.size != n:
                    raise DataError(
                        f" {name}.npy: {arr.size} tokens but the index says {n}; the "
                        "manifest/index disagree with the shard: rebuild with `loretta-shards index`"
                    )
                check_ids(arr, self.layout[name].size, f" {name}")
            except DataError as e:
                raise DataError(f"{self.where(i)}{e}") from e
            out[name] = arr
        return out

    def meta(self, i: int) -> dict[str, Any]:
        """The sample's {key}.json metadata ({} when it has none)."""
        rec = self.index[i]
        off, nb = int(rec["meta_offset"]), int(rec["meta_nbytes"])
        if off < 0 or nb == 0:
            return {}
        mm = self._shard_map(int(rec["shard"]))
        blob = mm[off : off + nb]
        if self.verify_samples and member_crc(bytes(rec["key"]), blob) != int(rec["meta_crc"]):
            raise DataError(
                f"{self.where(i)}: {self.key(i)}.json differs from its CRC32 in index.npy; the "
                "shard is corrupt: restore it (check with `loretta-shards verify`)"
            )
        try:
            return dict(json.loads(blob))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.where(i)}: corrupt {self.key(i)}.json ({e})") from e

    def iter_samples(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for i in range(len(self)):
            yield i, self.read(i)

    def close(self) -> None:
        for fh, mm in self._open.values():
            with contextlib.suppress(BufferError):
                mm.close()
            fh.close()
        self._open.clear()
