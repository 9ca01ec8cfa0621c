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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loretta.errors import DataError
from loretta.vocab import VocabLayout

FORMAT = "loretta-webdataset"
VERSION = 1
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
        ]
    )


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
    def from_dict(cls, d: dict[str, Any], where: str) -> Manifest:
        try:
            if d.get("version", VERSION) > VERSION:
                raise DataError(
                    f"{where}: manifest version {d['version']} is newer than this loretta "
                    f"understands ({VERSION}); upgrade loretta"
                )
            shards = [ShardInfo(**s) for s in d["shards"]]
            for s in shards:
                check_file_name(s.name, f"{where}: shard name")
            return cls(
                layout=VocabLayout.from_dict(d["layout"], where),
                shards=shards,
                index_sha256=d.get("index", {}).get("sha256", ""),
                format=d.get("format", FORMAT),
                meta=d.get("meta", {}),
            )
        except (KeyError, TypeError) as e:
            raise DataError(
                f"{where}: malformed manifest ({type(e).__name__}: {e}); "
                "rebuild it with `loretta-shards index <dataset>`"
            ) from e


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
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return Manifest.from_dict(d, str(path))


def load_index(
    path: Path, dtype: np.dtype, manifest: Manifest, dataset: str, fix: str
) -> np.ndarray:
    """Memory-map a per-sample index and check it against its manifest; `fix` says how to
    rebuild it (e.g. "`loretta-shards index DS`")."""
    if not path.exists():
        raise DataError(f"{path} not found; rebuild it with {fix}")
    try:
        index = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable index ({e}); rebuild it with {fix}") from e
    n, names = manifest.samples, manifest.layout.names
    if index.dtype != dtype or len(index) != n:
        raise DataError(
            f"{path}: index has {len(index)} records of {index.dtype.names} but the manifest "
            f"lists {n} samples over modalities {names}; the manifest disagrees with its "
            f"index: rebuild with {fix}"
        )
    if n == 0:
        raise DataError(f"dataset {dataset!r} is empty (0 samples); it cannot be sampled")
    return index


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
            raise DataError(f"{where}: corrupt .npy header ({e})") from e
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
                    rows[key]["__json__"] = (member.offset_data, member.size, 0)
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
                rows[key][mod] = (member.offset_data, member.size, int(arr.size))
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
        off, size, _ = rows[key].pop("__json__", (-1, 0, 0))
        idx[i]["meta_offset"], idx[i]["meta_nbytes"] = off, size
        if not rows[key]:
            raise DataError(f"{path}: sample {key!r} has no .npy modality members")
        for mod, (off, size, n) in rows[key].items():
            j = names.index(mod)
            idx[i]["offset"][j], idx[i]["nbytes"][j], idx[i]["length"][j] = off, size, n
    return idx, tokens


def check_ids(arr: np.ndarray, size: int, where: str) -> None:
    if arr.ndim != 1:
        raise DataError(f"{where}: token array has shape {arr.shape}; expected 1-D ids")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{where}: token array has dtype {arr.dtype}; expected integers")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= size):
        raise DataError(
            f"{where}: ids span [{int(arr.min())}, {int(arr.max())}] but the modality has "
            f"{size} ids (valid: 0..{size - 1}); re-tokenise or enlarge the layout"
        )
