"""On-disk dataset format: webdataset tar shards + manifest.json + a per-sample index.

A dataset folder (or URL prefix) holds::

    manifest.json         layout, shards (samples, tokens per modality, bytes, sha256), totals
    index.npy             one record per sample: shard, key, and per modality the byte offset and
                          size of its .npy member inside the tar and its token count (0 = absent)
    shard-000000.tar ...  members {key}.{modality}.npy (local ids) and {key}.json

The index is what makes the global stream a pure function of (seed, sources, weights,
position): the planner knows every sample's token counts without reading data, and a reader
fetches any sample with one slice of a memory-mapped shard.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loretta.errors import DataError
from loretta.vocab import VocabLayout

FORMAT = "loretta-webdataset"
VERSION = 2  # 2: index.npy holds a CRC32 of every member
KEY_BYTES = 64


def index_dtype(n_modalities: int) -> np.dtype:
    return np.dtype(
        [
            ("shard", np.int32),
            ("key", f"S{KEY_BYTES}"),
            ("offset", np.int64, (n_modalities,)),  # byte offset of the .npy member's data
            ("nbytes", np.int64, (n_modalities,)),
            ("length", np.int32, (n_modalities,)),  # tokens; 0 = modality absent
            ("meta_offset", np.int64),  # the {key}.json member (-1 if none)
            ("meta_nbytes", np.int64),
            ("crc", np.uint32, (n_modalities,)),  # zlib.crc32 of each .npy member (header+data)
            ("meta_crc", np.uint32),  # zlib.crc32 of the {key}.json member
        ]
    )


def index_dtype_v1(n_modalities: int) -> np.dtype:
    """The index of format version 1 (before per-member checksums): recognised to be refused."""
    return np.dtype([d for d in index_dtype(n_modalities).descr if d[0] not in ("crc", "meta_crc")])


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    layout: VocabLayout
    shards: list[ShardInfo]
    index_sha256: str = ""
    format: str = FORMAT
    meta: dict[str, Any] = field(default_factory=dict)  # free-form (builder config, ...)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def tokens(self) -> dict[str, int]:
        out = dict.fromkeys(self.layout.names, 0)
        for s in self.shards:
            for m, n in s.tokens.items():
                out[m] = out.get(m, 0) + n
        return out

    def summary(self) -> str:
        """'2 shards, 1,000 samples, tokens: image 16,000, text 9,000'."""
        toks = ", ".join(f"{k} {v:,}" for k, v in self.tokens.items())
        return f"{len(self.shards)} shards, {self.samples:,} samples, tokens: {toks}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": VERSION,
            "layout": self.layout.to_dict(),
            "samples": self.samples,
            "tokens": self.tokens,
            "index": {"file": "index.npy", "sha256": self.index_sha256},
            "shards": [vars(s) for s in self.shards],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Manifest:
        """A manifest from its JSON form; every field is type-checked (DataError naming the
        manifest, the field, the value and the fix)."""
        fix = "rebuild the manifest with `loretta-shards index FOLDER` (or rewrite the dataset)"
        if not isinstance(d, dict):
            raise DataError(
                f"{where}: expected a JSON object, got a JSON {type(d).__name__} "
                f"({_short(d)}); {fix}"
            )
        version = d.get("version", VERSION)
        if not _is_int(version) or version < 1:
            raise DataError(f"{where}: field 'version' = {_short(version)} is not a version >= 1")
        if version > VERSION:
            raise DataError(
                f"{where}: manifest version {version} is newer than this loretta "
                f"understands ({VERSION}); upgrade loretta"
            )
        for k in ("layout", "shards"):
            if k not in d:
                raise DataError(f"{where}: required field {k!r} is missing; {fix}")
        fmt = _typed(d, "format", str, where, fix, FORMAT)
        meta = _typed(d, "meta", dict, where, fix, {})
        index = _typed(d, "index", dict, where, fix, {})
        sha = _typed(index, "sha256", str, where, fix, "", "index.sha256")
        if not isinstance(d["layout"], dict):
            raise DataError(
                f"{where}: field 'layout' = {_short(d['layout'])} is not an object; {fix}"
            )
        try:
            layout = VocabLayout.from_dict(d["layout"], where)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(
                f"{where}: field 'layout' is malformed ({type(e).__name__}: {e}); {fix}"
            ) from e
        raw = d["shards"]
        if not isinstance(raw, list) or not raw:
            raise DataError(
                f"{where}: field 'shards' = {_short(raw)} is not a non-empty list; {fix}"
            )
        shards = [_shard_info(s, layout, f"shards[{k}]", where, fix) for k, s in enumerate(raw)]
        m = cls(layout=layout, shards=shards, index_sha256=sha, format=fmt, meta=meta)
        # the totals are derived from the shard table (which is what is used): type-checked only
        if "samples" in d and (not _is_int(d["samples"]) or d["samples"] < 0):
            raise DataError(
                f"{where}: field 'samples' = {_short(d['samples'])} is not a count (an integer "
                f">= 0); {fix}"
            )
        tokens = _typed(d, "tokens", dict, where, fix, {})
        for k, v in tokens.items():
            if not _is_int(v) or v < 0:
                raise DataError(
                    f"{where}: field 'tokens.{k}' = {_short(v)} is not a count (an integer "
                    f">= 0); {fix}"
                )
        return m


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: object, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _typed(
    d: dict[str, Any], key: str, typ: type, where: str, fix: str, default: Any, name: str = ""
) -> Any:
    """d[key] if it has type `typ` (default when absent); else a DataError naming it."""
    if key not in d:
        return default
    v = d[key]
    if not isinstance(v, typ):
        raise DataError(
            f"{where}: field {name or key!r} = {_short(v)} is a {type(v).__name__}, expected "
            f"a {'JSON object' if typ is dict else typ.__name__}; {fix}"
        )
    return v


def _shard_info(s: Any, layout: VocabLayout, name: str, where: str, fix: str) -> ShardInfo:
    if not isinstance(s, dict):
        raise DataError(f"{where}: field {name!r} = {_short(s)} is not an object; {fix}")
    unknown = sorted(set(s) - {"name", "samples", "bytes", "sha256", "tokens"})
    if unknown:
        raise DataError(f"{where}: field {name!r} has unknown fields {unknown}; {fix}")
    for k in ("name", "samples", "bytes", "sha256"):
        if k not in s:
            raise DataError(f"{where}: field '{name}.{k}' is missing; {fix}")
    for k in ("samples", "bytes"):
        v = s[k]
        if not _is_int(v) or v < 0:
            raise DataError(
                f"{where}: field '{name}.{k}' = {_short(v)} is not a count (an integer >= 0); {fix}"
            )
    if not isinstance(s["sha256"], str):
        raise DataError(f"{where}: field '{name}.sha256' = {_short(s['sha256'])} is not a string")
    check_file_name(s["name"], f"{where}: field '{name}.name' (shard name)")
    tokens = s.get("tokens", {})
    if not isinstance(tokens, dict):
        raise DataError(
            f"{where}: field '{name}.tokens' = {_short(tokens)} is not an object; {fix}"
        )
    for m, n in tokens.items():
        if m not in layout:
            raise DataError(
                f"{where}: field '{name}.tokens' names modality {m!r}, not in the layout "
                f"{layout.names}; {fix}"
            )
        if not _is_int(n) or n < 0:
            raise DataError(
                f"{where}: field '{name}.tokens.{m}' = {_short(n)} is not a count (an integer "
                f">= 0); {fix}"
            )
    return ShardInfo(s["name"], s["samples"], s["bytes"], s["sha256"], dict(tokens))


# A file named by a manifest or a streaming index.json comes from outside: it must be a plain
# name inside the dataset folder (no folders, no '..', nothing a shell or URL would interpret).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=-]{0,254}")


def check_file_name(name: object, where: str) -> str:
    """`name` if it is a plain file name; else a DataError naming `where`, the value and the fix."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise DataError(
            f"{where} {name!r} is not a plain file name (letters, digits and ._+=- only; no "
            "'/', no '..', no spaces or shell characters); shards must sit directly in the "
            "dataset folder: rename the file and rebuild the manifest with `loretta-shards "
            "index FOLDER`"
        )
    return name


def read_manifest(path: str | Path) -> Manifest:
    """The manifest.json at `path`, checked; a DataError that says how to make one if absent."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        folder = path.parent
        if (folder / "index.json").exists():
            how = (
                f"it holds a streaming index.json (MDS written by MDSWriter): adopt it with "
                f"`loretta-shards index {folder} --layout layout.json`"
            )
        else:
            how = (
                "write datasets with `loretta-shards write`, or index existing tars (.tar or "
                f".tar.gz) with `loretta-shards index {folder} --layout layout.json`"
            )
        raise DataError(f"{path} not found: the dataset has no manifest; {how}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); the manifest is corrupt") from e
    return Manifest.from_dict(d, str(path))


def load_index(
    path: Path,
    dtype: np.dtype,
    manifest: Manifest,
    dataset: str,
    fix: str,
    old_dtypes: tuple[np.dtype, ...] = (),
) -> np.ndarray:
    """Memory-map a per-sample index and check it against its manifest: its sha256 equals the
    manifest's `index.sha256`, and its shard column and token counts agree with the shard
    table. `fix` says how to rebuild it (e.g. "`loretta-shards index DS`"); an index of one of
    `old_dtypes` (an older format without per-member checksums) is refused with it too."""
    if not path.exists():
        raise DataError(f"{path} not found; rebuild it with {fix}")
    if not manifest.index_sha256:
        raise DataError(
            f"{path}: the manifest records no index.sha256, so the index cannot be checked; "
            f"rebuild both with {fix}"
        )
    digest = sha256_file(path)
    if digest != manifest.index_sha256:
        raise DataError(
            f"{path}: sha256 {digest[:12]}... differs from the manifest's index.sha256 "
            f"{manifest.index_sha256[:12]}...; the index is corrupt or was edited: rebuild it "
            f"with {fix}"
        )
    try:
        index = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable index ({e}); rebuild it with {fix}") from e
    if not isinstance(index, np.ndarray):
        raise DataError(f"{path}: not a single array; rebuild it with {fix}")
    n, names = manifest.samples, manifest.layout.names
    if index.dtype in old_dtypes:
        raise DataError(
            f"{path}: an index without per-sample checksums (written by an older loretta); "
            f"samples cannot be verified as they are read: rebuild it with {fix}"
        )
    if index.dtype != dtype or index.shape != (n,):
        raise DataError(
            f"{path}: index has {len(index)} records of {index.dtype.names} but the manifest "
            f"lists {n} samples over modalities {names}; the manifest disagrees with its "
            f"index: rebuild with {fix}"
        )
    if n == 0:
        raise DataError(f"dataset {dataset!r} is empty (0 samples); it cannot be sampled")
    check_index_records(index, manifest, path, fix)
    return index


def check_index_records(index: np.ndarray, manifest: Manifest, path: Path, fix: str) -> None:
    """The index's shard column and token counts agree with the manifest's shard table."""
    counts = [s.samples for s in manifest.shards]
    shard = np.asarray(index["shard"])
    want = np.repeat(np.arange(len(counts), dtype=shard.dtype), counts)
    if not np.array_equal(shard, want):
        k = int(np.flatnonzero(shard != want)[0])
        raise DataError(
            f"{path}: record {k} is in shard {int(shard[k])} but the manifest's shard table "
            f"({len(counts)} shards of {counts[:8]}... samples) puts it in shard {int(want[k])}; "
            f"rebuild with {fix}"
        )
    lengths = np.asarray(index["length"])
    if lengths.size and int(lengths.min()) < 0:
        k = int(np.flatnonzero((lengths < 0).any(axis=1))[0])
        raise DataError(f"{path}: record {k} has a negative token count; rebuild with {fix}")
    starts = np.concatenate([[0], np.cumsum(counts)])
    cum = np.concatenate(
        [np.zeros((1, lengths.shape[1]), np.int64), lengths.cumsum(axis=0, dtype=np.int64)]
    )
    sums = cum[starts[1:]] - cum[starts[:-1]]
    for sid, s in enumerate(manifest.shards):
        got = {m: int(t) for m, t in zip(manifest.layout.names, sums[sid])}
        listed = {m: s.tokens.get(m, 0) for m in manifest.layout.names}
        if got != listed:
            raise DataError(
                f"{path}: shard {s.name} holds tokens {got} by the index but {listed} by the "
                f"manifest; the index or manifest was edited: rebuild with {fix}"
            )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def replace_dir(tmp: Path, dst: Path) -> None:
    """Rename the finished folder `tmp` to `dst`. An existing `dst` (folder, file or link) is
    first renamed aside and removed only once `tmp` is in place: at every moment `dst` is either
    the old or the new content. Callers decide whether an existing `dst` may be replaced."""
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, dst)
    fsync_dir(dst.parent)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) for this block."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


# ---- .npy members ---------------------------------------------------------------------------
_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def parse_npy(buf: memoryview | bytes, where: str) -> np.ndarray:
    """Decode an .npy member from bytes (zero-copy). Headers are cached: they repeat a lot."""
    b = memoryview(buf)
    if len(b) < 10 or bytes(b[:6]) != b"\x93NUMPY":
        raise DataError(f"{where}: not an .npy array (bad magic); the shard is corrupt")
    major = b[6]
    if major == 1:
        hlen, start = int.from_bytes(b[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(b[8:12], "little"), 12
    else:
        raise DataError(f"{where}: unsupported .npy version {major}")
    header = bytes(b[start : start + hlen])
    parsed = _HEADER_CACHE.get(header)
    if parsed is None:
        try:
            d = ast.literal_eval(header.decode("latin1"))
            if d.get("fortran_order"):
                raise ValueError("fortran order")
            parsed = (np.dtype(d["descr"]), tuple(d["shape"]))
        except (ValueError, SyntaxError, KeyError, TypeError) as e:
            raise DataError(f"{where}: corrupt .npy header ({e}); the shard is corrupt") from e
        if parsed[0].hasobject:
            raise DataError(
                f"{where}: object dtype {parsed[0]} refused (it would need unpickling); token "
                "arrays hold integer ids: re-tokenise the sample"
            )
        if len(_HEADER_CACHE) < 65536:
            _HEADER_CACHE[header] = parsed
    dtype, shape = parsed
    count = int(np.prod(shape)) if shape else 1
    data = b[start + hlen :]
    if len(data) != count * dtype.itemsize:
        raise DataError(
            f"{where}: .npy holds {len(data)} bytes but its header says {shape} {dtype}; "
            "the shard is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def npy_bytes(arr: np.ndarray) -> bytes:
    """An .npy file of `arr` (any dtype, structured ones included; never pickled)."""
    f = io.BytesIO()
    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
    return f.getvalue()


def progress_bar(on: bool, unit: str) -> Any:
    """A tqdm bar counting `unit`, or None when `on` is false (callers test for None)."""
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(unit=unit, dynamic_ncols=True)


def token_dtype(size: int) -> np.dtype:
    return np.dtype(np.uint16) if size <= 65536 else np.dtype(np.int32)


# ---- scanning tars --------------------------------------------------------------------------
def split_member(name: str) -> tuple[str, str]:
    """'dir/abc.image.npy' -> ('dir/abc', 'image.npy'): webdataset's key/field split."""
    base = name.rsplit("/", 1)
    stem = base[-1]
    dot = stem.find(".")
    if dot < 0:
        return name, ""
    prefix = (base[0] + "/") if len(base) == 2 else ""
    return prefix + stem[:dot], stem[dot + 1 :]


def scan_shard(
    path: str | Path, shard_id: int, layout: VocabLayout, validate: bool = True
) -> tuple[np.ndarray, dict[str, int]]:
    """Index one tar: per sample its members' offsets, sizes and token counts.

    With `validate`, every array is decoded and its ids checked against the modality's range.
    Raises DataError naming the shard, key and problem.
    """
    names = layout.names
    M = len(names)
    rows: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    tokens = dict.fromkeys(names, 0)
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, fld = split_member(member.name)
                if key not in rows:
                    rows[key] = {}
                    order.append(key)
                if fld == "json":
                    raw.seek(member.offset_data)
                    blob = raw.read(member.size)
                    rows[key]["__json__"] = (member.offset_data, member.size, member_crc(key, blob))
                    continue
                if not fld.endswith(".npy"):
                    continue
                mod = fld[: -len(".npy")]
                if mod not in layout:
                    raise DataError(
                        f"{path}: sample {key!r} has modality {mod!r}, not in the layout "
                        f"{names}; rebuild with a layout that includes it"
                    )
                raw.seek(member.offset_data)
                blob = raw.read(member.size)
                if len(blob) != member.size:
                    raise DataError(f"{path}: sample {key!r} member {member.name} is truncated")
                arr = parse_npy(blob, f"{path}: sample {key!r} member {member.name}")
                if validate:
                    check_ids(arr, layout[mod].size, f"{path}: sample {key!r} {mod}")
                crc = member_crc(key, blob)
                rows[key][mod] = (member.offset_data, member.size, int(arr.size), crc)
                tokens[mod] += int(arr.size)
    except tarfile.TarError as e:
        raise DataError(
            f"{path}: not a readable tar ({e}); the shard is truncated or corrupt"
        ) from e
    idx = np.zeros(len(order), dtype=index_dtype(M))
    for i, key in enumerate(order):
        if len(key.encode()) > KEY_BYTES:
            raise DataError(f"{path}: sample key {key!r} is longer than {KEY_BYTES} bytes")
        idx[i]["shard"] = shard_id
        idx[i]["key"] = key.encode()
        off, size, crc = rows[key].pop("__json__", (-1, 0, 0))
        idx[i]["meta_offset"], idx[i]["meta_nbytes"], idx[i]["meta_crc"] = off, size, crc
        if not rows[key]:
            raise DataError(f"{path}: sample {key!r} has no .npy modality members")
        for mod, (off, size, n, crc) in rows[key].items():
            j = names.index(mod)
            idx[i]["offset"][j], idx[i]["nbytes"][j], idx[i]["length"][j] = off, size, n
            idx[i]["crc"][j] = crc
    return idx, tokens


def member_crc(key: str | bytes, data: bytes | memoryview | np.ndarray) -> int:
    """CRC32 of a member's bytes, seeded with its sample key: an index record that points at
    another sample's member (or a member moved under another key) fails the check too."""
    buf = data.data if isinstance(data, np.ndarray) else data  # ndarray: C-contiguous
    return zlib.crc32(buf, zlib.crc32(key.encode() if isinstance(key, str) else key))


def check_ids(arr: np.ndarray, size: int, where: str) -> None:
    if arr.ndim != 1:
        raise DataError(
            f"{where}: token array has shape {arr.shape}; expected 1-D ids: re-tokenise the "
            "sample into one 1-D integer array per modality"
        )
    if arr.dtype.kind not in "iu":
        raise DataError(
            f"{where}: token array has dtype {arr.dtype}; expected integers: re-tokenise the "
            "sample (write ids as uint16/int32)"
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= size):
        raise DataError(
            f"{where}: ids span [{int(arr.min())}, {int(arr.max())}] but the modality has "
            f"{size} ids (valid: 0..{size - 1}); re-tokenise or enlarge the layout"
        )
