"""mosaicml-streaming (MDS) datasets: random access by global sample index for the loader.
(Conversion to and from our webdataset format, and adopting folders written by a plain
`MDSWriter`, live in loretta/data/mds_convert.py.)

A dataset written by `to_mds` is a folder (or an object-store prefix)::

    index.json            streaming's index (shards, columns)
    shard.00000.mds ...   MDS shards; by default one per source tar, so that the planner's
                          shard-local epoch order, and therefore every batch, equals the source's
    manifest.json         ours: format "loretta-mds", the layout, shards (samples, bytes, sha256,
                          tokens per modality), the sha256 of the index
    loretta_index.npy     per sample: MDS shard, key, tokens per modality (the planner's input)

Columns: one ``ndarray:uint16`` (``int32`` above 65,536 ids) per modality, ``lengths``
(``ndarray:int32``, tokens per modality, 0 = absent), ``key`` (str) and ``meta`` (json).
streaming refuses to encode an empty array, so an absent modality holds one placeholder id and
``lengths`` says 0: plain-streaming readers must look at ``lengths`` too.

A folder written by a plain `MDSWriter` is read too once adopted (`loretta-shards index FOLDER
--layout L` writes manifest.json and loretta_index.npy next to it): its columns are one
``ndarray`` column per modality of the layout, and optionally ``key`` (str), ``meta`` (json)
and ``lengths``; samples without a ``key`` column are keyed by their index.

Processes. A `StreamingDataset` finds its shared memory (shard states, cache accounting) under a
prefix that local rank 0 registers and the other local ranks look up; to order the two it calls
``torch.distributed.barrier()`` when a process group exists, and when none exists but
WORLD_SIZE > 1 it creates and destroys a process group of its own. Constructing one is therefore
a collective operation in a multi-rank job, so `MdsDataset` constructs it

* at once, as a one-process world, when no launcher says otherwise (tools, tests);
* at once, collectively, when a process group exists: every rank must open the dataset at the
  same point (loretta's RankStream does, after init), with RANK/WORLD_SIZE taken from the group
  and LOCAL_RANK/LOCAL_WORLD_SIZE from the launcher (`loretta.dist.discover`);
* not at all when a multi-rank launcher is set up but no group exists yet (loretta checks the
  config and data before init): only the manifest and index are read. A read in that state
  builds a private one-process StreamingDataset under a file lock, which is safe for local
  folders; remote datasets must be opened after init.

DataLoader workers (fork) inherit the constructed object: a read needs only the shard files and
the inherited shared memory, never a collective. streaming keeps file locks in
`tempfile.gettempdir()` and skips prefixes whose locks exist, so jobs that share a machine
should each set their own TMPDIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loretta.data.format import (
    KEY_BYTES,
    check_file_name,
    check_ids,
    file_lock,
    load_index,
    member_crc,
    read_manifest,
    sha256_file,
    token_dtype,
)
from loretta.data.remote import cache_folder, is_url, streaming_fetch, streaming_remote
from loretta.errors import DataError
from loretta.vocab import VocabLayout

MDS_FORMAT = "loretta-mds"
MDS_INDEX = "loretta_index.npy"
RESERVED_COLUMNS = ("lengths", "key", "meta")
# MDS stores sample offsets as uint32 and requires size_limit < 2**32; one source tar normally
# fits (64 MiB by default) and a larger one is split by the writer.
SHARD_LIMIT = 1 << 31


def mds_index_dtype(n_modalities: int) -> np.dtype:
    return np.dtype(
        [
            ("shard", np.int32),  # MDS shard (position in index.json)
            ("key", f"S{KEY_BYTES}"),
            ("length", np.int32, (n_modalities,)),  # tokens; 0 = modality absent
            ("crc", np.uint32, (n_modalities,)),  # member_crc(key, ids as stored) per modality
        ]
    )


def mds_index_dtype_v1(n_modalities: int) -> np.dtype:
    """loretta_index.npy before per-sample checksums: recognised to be refused."""
    return np.dtype([d for d in mds_index_dtype(n_modalities).descr if d[0] != "crc"])


def ids_crc(key: str | bytes, arr: np.ndarray) -> int:
    """The per-sample check of an MDS modality column: a CRC32 of the ids' bytes as stored
    (seeded with the key). streaming itself checks shard hashes only when index.json lists
    them and only on download (`validate_hash`), so this is what catches a flipped byte."""
    return member_crc(key, np.ascontiguousarray(arr))


def mds_columns(layout: VocabLayout) -> dict[str, str]:
    """streaming column encodings for a layout (modalities first, in layout order)."""
    cols = {}
    for m in layout.modalities:
        if m.name in RESERVED_COLUMNS:
            raise DataError(
                f"modality {m.name!r} clashes with an MDS column of the same name "
                f"{RESERVED_COLUMNS}; rename the modality in the layout"
            )
        cols[m.name] = f"ndarray:{token_dtype(m.size).name}"
    cols.update(lengths="ndarray:int32", key="str", meta="json")
    return cols


# ==== reading ==================================================================================
# (remote, local folder, index sha256) -> StreamingDataset, shared by this process's MdsDatasets
_OPEN: dict[tuple[str | None, str, str], Any] = {}


def stored_name(entry: dict[str, Any]) -> str:
    """The file of an index.json shard that exists on disk (the zip when compressed)."""
    return str((entry.get("zip_data") or entry["raw_data"])["basename"])


def streaming_shards(path: Path) -> list[dict[str, Any]]:
    """The shard entries of a streaming index.json, with their stored file names checked."""
    try:
        shards = json.loads(path.read_text())["shards"]
        if not isinstance(shards, list) or not shards:
            raise ValueError("no shards")
        for k, e in enumerate(shards):
            check_file_name(stored_name(e), f"{path}: shard {k} file")
            int(e["samples"])
    except FileNotFoundError:
        raise DataError(f"{path} not found: not an MDS dataset folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed streaming index ({type(e).__name__}: {e})") from e
    return shards


def _mode() -> str:
    """How this process may construct a StreamingDataset now (see the module docstring)."""
    import torch

    from loretta.dist import discover

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        if torch.utils.data.get_worker_info() is not None:
            return "forbidden"  # a forked worker: the group's sockets belong to the parent
        return "collective"
    return "defer" if discover().world_size > 1 else "solo"


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _world_env(mode: str) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE as streaming should see them."""
    if mode != "collective":
        return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    import torch

    from loretta.dist import discover

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = discover()
    local_rank, local_world = (
        (info.local_rank, info.local_world_size) if info.world_size == world else (rank, world)
    )
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world),
    }


@contextlib.contextmanager
def _solo_lock() -> Iterator[None]:
    """Serialise one-process constructions on this machine: each registers its own prefix, and
    two scanning at once would pick the same one."""
    with file_lock(os.path.join(tempfile.gettempdir(), "loretta-mds-open.lock")):
        yield


def local_streaming(folder: Path, where: str) -> Any:
    """A one-process StreamingDataset over a local MDS folder (for tools that scan it)."""
    return _construct(None, str(folder), "solo", where)


def _construct(remote: str | None, local: str, mode: str, where: str) -> Any:
    from streaming import StreamingDataset

    lock = _solo_lock() if mode != "collective" else contextlib.nullcontext()
    try:
        with lock, _environ(_world_env(mode)):
            return StreamingDataset(
                remote=remote,
                local=local,
                shuffle=False,
                predownload=8,  # unused by random access; set so streaming does not log it
                allow_unsafe_types=False,
            )
    except ValueError as e:
        if "Reused local directory" in str(e):
            raise DataError(
                f"{where}: another live StreamingDataset uses the cache folder {local} for this "
                "remote. In a multi-rank job open the dataset after torch.distributed is "
                "initialised, on every rank; after a killed run, free its shared memory once "
                "with `python -c 'import streaming.base.util as u; "
                "u.clean_stale_shared_memory()'`"
            ) from e
        raise DataError(f"{where}: streaming could not open the dataset ({e})") from e
    except (RuntimeError, OSError, KeyError) as e:
        raise DataError(
            f"{where}: streaming could not open the dataset ({type(e).__name__}: {e})"
        ) from e


class MdsDataset:
    """Random access to an MDS dataset written by `to_mds` (or adopted with `adopt_mds`), by
    global sample index (0..n-1).

    `path` is a local folder (read in place) or a URL that mosaicml-streaming reads (s3://,
    gs://, ..., or file:///path), whose shards are downloaded into `cache_dir` on first use.
    Token counts come from loretta_index.npy; samples are read with StreamingDataset.get_item.
    """

    def __init__(
        self,
        path: str,
        cache_dir: str | Path = "",
        verify_checksums: bool = False,
        verify_samples: bool = True,
    ) -> None:
        self.path = str(path)
        self.verify_checksums, self.verify_samples = verify_checksums, verify_samples
        self.remote: str | None = None
        if is_url(self.path):
            self.remote = streaming_remote(self.path)
            self.local = cache_folder(self.path, cache_dir)
            for name in ("manifest.json", MDS_INDEX, "index.json"):
                streaming_fetch(self.remote, name, self.local)
        else:
            self.local = Path(self.path)
            if not self.local.is_dir():
                raise DataError(f"dataset folder {self.path!r} does not exist")
        self.manifest = read_manifest(self.local / "manifest.json")
        if self.manifest.format != MDS_FORMAT:
            raise DataError(
                f"{self.local / 'manifest.json'}: format {self.manifest.format!r}, expected "
                f"{MDS_FORMAT!r}; open webdataset folders with loretta.data.sources.open_dataset"
            )
        self.layout = self.manifest.layout
        self.shard_counts = [s.samples for s in self.manifest.shards]
        # how to rebuild what loretta wrote beside the shards: re-adopt or re-convert
        adopted = "adopted_mds" in self.manifest.meta
        self._fix = f"`loretta-shards index {self.path}`" if adopted else "`loretta-shards to-mds`"
        self._load_index()
        self.lengths = np.ascontiguousarray(self.index["length"])  # (n, M) tokens per modality
        self._check_streaming_index()
        if self.remote is None:
            self._check_shard_files()
        self._names = self.layout.names
        self._col = {n: j for j, n in enumerate(self._names)}
        self._sizes = [m.size for m in self.layout.modalities]
        self._verified: set[int] = set()
        self._sd: Any = None
        if _mode() in ("solo", "collective"):
            self._streaming(at_open=True)

    # ---- checks --------------------------------------------------------------------------------
    def _load_index(self) -> None:
        M = len(self.layout.names)
        old = (mds_index_dtype_v1(M),)
        path, fix = self.local / MDS_INDEX, self._fix
        self.index = load_index(path, mds_index_dtype(M), self.manifest, self.path, fix, old)

    def _check_streaming_index(self) -> None:
        p = self.local / "index.json"
        shards = streaming_shards(p)
        theirs = [(stored_name(e), int(e["samples"])) for e in shards]
        self._columns = set(shards[0].get("column_names") or ())
        ours = [(s.name, s.samples) for s in self.manifest.shards]
        if theirs != ours:
            diff = next(
                (f"shard {k}: {a} vs {b}" for k, (a, b) in enumerate(zip(theirs, ours)) if a != b),
                f"{len(theirs)} vs {len(ours)} shards",
            )
            raise DataError(
                f"{p} disagrees with manifest.json ({diff}); the folder was modified after "
                f"conversion: rebuild with {self._fix}"
            )

    def _check_shard_files(self) -> None:
        for s in self.manifest.shards:
            f = self.local / s.name
            if not f.exists():
                raise DataError(
                    f"{f}: shard listed in the manifest is missing; restore it or rebuild "
                    f"with {self._fix}"
                )
            if f.stat().st_size != s.bytes:
                raise DataError(
                    f"{f}: {f.stat().st_size} bytes but the manifest says {s.bytes}; the shard "
                    "is truncated or was rewritten: restore it or re-convert"
                )

    # ---- streaming -----------------------------------------------------------------------------
    def _streaming(self, at_open: bool = False) -> Any:
        if self._sd is not None:
            return self._sd
        # the index checksum tells a rewritten dataset at the same path from the one cached
        key = (self.remote, str(self.local.resolve()), self.manifest.index_sha256)
        sd = _OPEN.get(key)
        if sd is None:
            mode = _mode()
            if mode == "forbidden":
                raise DataError(
                    f"{self.path}: the MDS dataset was opened before torch.distributed was "
                    "initialised and first read in a DataLoader worker; open it after init, in "
                    "the main process of every rank (as loretta's loader does)"
                )
            if mode == "collective" and not at_open:
                raise DataError(
                    f"{self.path}: the MDS dataset was opened before torch.distributed was "
                    "initialised and first read after it; constructing StreamingDataset is a "
                    "collective step, so open the dataset again after init, on every rank"
                )
            sd = _OPEN[key] = _construct(
                self.remote, key[1], "solo" if mode == "defer" else mode, self.path
            )
            if int(sd.num_samples) != len(self) or [len(s) for s in sd.shards] != self.shard_counts:
                raise DataError(
                    f"{self.path}: streaming reads {sd.num_samples} samples in shards of "
                    f"{[len(s) for s in sd.shards][:8]}... but the manifest lists {len(self)} in "
                    f"{self.shard_counts[:8]}...; rebuild with {self._fix}"
                )
        self._sd = sd
        return sd

    def __getstate__(self) -> dict[str, Any]:
        # spawned workers rebuild their own StreamingDataset (shared memory does not pickle)
        return {**self.__dict__, "_sd": None, "index": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.index = np.load(self.local / MDS_INDEX, mmap_mode="r")

    # ---- the dataset interface -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def modality_names(self) -> list[str]:
        return self.layout.names

    def shard_of(self, i: int) -> int:
        return int(self.index[i]["shard"])

    def key(self, i: int) -> str:
        return bytes(self.index[i]["key"]).decode()

    def where(self, i: int) -> str:
        return f"{self.path}/{self.manifest.shards[self.shard_of(i)].name} sample {self.key(i)!r}"

    def _verify_shard(self, sd: Any, sid: int) -> None:
        sd.prepare_shard(sid)  # downloads a remote shard into the cache
        info = self.manifest.shards[sid]
        f = self.local / info.name
        digest = sha256_file(f)
        if digest != info.sha256:
            raise DataError(
                f"{f}: sha256 {digest[:12]}... differs from the manifest's {info.sha256[:12]}...; "
                "the shard is corrupt or was replaced"
            )
        self._verified.add(sid)

    def sample(self, i: int) -> dict[str, Any]:
        """Every column of sample `i` as streaming decodes it (placeholders included)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        sd = self._streaming()
        if self.verify_checksums and self.shard_of(i) not in self._verified:
            self._verify_shard(sd, self.shard_of(i))
        try:
            s = sd.get_item(int(i))
        except Exception as e:
            raise DataError(
                f"{self.where(i)}: unreadable MDS sample ({type(e).__name__}: {e}); the shard "
                "is corrupt or missing: restore it or re-convert"
            ) from e
        if not isinstance(s, dict) or ("key" in self._columns and s.get("key") != self.key(i)):
            got = s.get("key") if isinstance(s, dict) else type(s).__name__
            raise DataError(
                f"{self.where(i)}: streaming returned sample {got!r}; the shards disagree with "
                f"loretta_index.npy: rebuild with {self._fix}"
            )
        return s

    def read(
        self,
        i: int,
        modalities: list[str] | None = None,
        sample: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Local-id arrays of sample `i` (modalities it lacks are left out)."""
        s = self.sample(i) if sample is None else sample
        want = self.lengths[i].tolist()
        key, crcs = bytes(self.index[i]["key"]), self.index[i]["crc"]
        got = s.get("lengths")
        out = {}
        try:  # messages name the file and sample; formatted only when there is one
            if "lengths" not in self._columns:
                pass  # adopted plain MDS: every array's length is checked below
            elif not isinstance(got, np.ndarray) or got.tolist() != want:
                raise DataError(
                    f": lengths column {got!r} differs from loretta_index.npy {want}; "
                    f"rebuild with {self._fix}"
                )
            for name in self._names if modalities is None else modalities:
                j = self._col.get(name)
                if j is None:
                    raise DataError(f": modality {name!r} is not in the layout {self._names}")
                n = want[j]
                if n == 0:
                    continue
                arr = s.get(name)
                if not isinstance(arr, np.ndarray) or arr.shape != (n,):
                    shape = getattr(arr, "shape", type(arr).__name__)
                    raise DataError(
                        f" {name}: array of shape {shape}, but the index says {n} tokens; the "
                        f"shard is corrupt: rebuild with {self._fix}"
                    )
                if self.verify_samples and ids_crc(key, arr) != int(crcs[j]):
                    raise DataError(
                        f" {name}: ids differ from their CRC32 in {MDS_INDEX}; the shard is "
                        f"corrupt: restore it or rebuild with {self._fix}"
                    )
                check_ids(arr, self._sizes[j], f" {name}")
                out[name] = arr
        except DataError as e:
            raise DataError(f"{self.where(i)}{e}") from e
        return out

    def meta(self, i: int) -> dict[str, Any]:
        if "meta" not in self._columns:
            return {}
        m = self.sample(i).get("meta")
        if not isinstance(m, dict):
            raise DataError(f"{self.where(i)}: meta column holds {type(m).__name__}, not a dict")
        return m

    def iter_samples(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for i in range(len(self)):
            yield i, self.read(i)

    def close(self) -> None:
        """Forget this object's reference; the StreamingDataset stays shared in the process."""
        self._sd = None
