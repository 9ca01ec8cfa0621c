"""Files, read and written with the libraries: torch archives with ``torch.load(mmap=True,
weights_only=True)``, safetensors with ``safe_open`` and ``save_file``; plus the YAML, JSON and
vocabulary-layout side files of a checkpoint folder.

Every error names the file and says what is wrong with it (missing, truncated, corrupt).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from loretta.errors import CheckpointError, DataError
from loretta.vocab import VocabLayout

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names (safe_open's get_dtype) -> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, without a copy (bf16 has no numpy dtype)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes in its stored dtype (C order, little-endian), 16 hex."""
    return hashlib.sha256(bytes_view(t.contiguous())).hexdigest()[:16]


# ---- side files -------------------------------------------------------------------------------
def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} unreadable ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a YAML mapping with a 'model' section")
    return data


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} unreadable ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_layout_file(path: Path) -> VocabLayout:
    try:
        return VocabLayout.from_dict(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError, DataError) as e:
        raise CheckpointError(f"{path} unreadable ({e})") from e


# ---- torch archives -----------------------------------------------------------------------------
class ForeignObject:
    """Stands in for a class DeepSpeed pickles into its checkpoint files (ZeroStageEnum,
    LossScaler, ...): keeps the constructor arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


_FOREIGN: dict[str, type[ForeignObject]] = {}


def _stub(qualname: str) -> type[ForeignObject]:
    if qualname not in _FOREIGN:
        module, _, name = qualname.rpartition(".")
        _FOREIGN[qualname] = type(name, (ForeignObject,), {"__module__": module})
    return _FOREIGN[qualname]


def _not_an_archive(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a complete torch.save archive ({type(e).__name__}: {e}); the file is "
        "truncated or corrupt (or was saved in the legacy non-zip format)"
    )


def load_torch_archive(path: Path) -> Any:
    """``torch.load(path, mmap=True, weights_only=True, map_location="cpu")``: tensors are views
    of the mapped file (nothing is read until used) and no code from the file runs. DeepSpeed's
    own classes become inert ForeignObject stubs; any other class is refused."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()  # the central directory is at the end: a truncated file fails here
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (OSError, RuntimeError, ValueError, zipfile.BadZipFile) as e:
        raise _not_an_archive(path, e) from e
    other = [n for n in names if not n.startswith("deepspeed.")]
    if other:
        raise CheckpointError(
            f"{path}: pickles classes {other}; only tensors, containers and DeepSpeed's own "
            "records are accepted in a checkpoint"
        )
    try:
        with torch.serialization.safe_globals([(_stub(n), n) for n in names]):
            return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(
            f"{path}: unreadable object tree ({type(e).__name__}: {e}); the file is corrupt"
        ) from e


def record_crcs(path: Path) -> dict[int, set[int]]:
    """{size in bytes: CRC-32s} of the tensor records of a torch archive (its zip central
    directory), to check data read through torch.load's mapping, which checks nothing."""
    out: dict[int, set[int]] = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename:
                out.setdefault(info.file_size, set()).add(info.CRC)
    return out


# ---- safetensors --------------------------------------------------------------------------------
class SafetensorsFolder:
    """model.safetensors, or the shards listed by model.safetensors.index.json, opened with
    safetensors.safe_open (headers checked against the file sizes on open)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.folder = folder
        index = folder / INDEX_FILE
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            names = sorted(set(weight_map.values()))
        elif (folder / SINGLE_FILE).exists():
            weight_map, names = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}")
        self.files: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        self._infos: list[TensorInfo] = []
        for n in names:
            path = folder / n
            if not path.exists():
                raise CheckpointError(f"{path}: missing (listed in {index})")
            try:
                f = safe_open(str(path), framework="pt", device="cpu")
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{path}: {name} has unsupported dtype {dtype}")
                    self._infos.append(TensorInfo(name, tuple(sl.get_shape()), dtype))
                    self.where[name] = n
            except SafetensorError as e:
                raise CheckpointError(
                    f"{path}: unreadable safetensors file ({e}); the file is truncated or "
                    "corrupt. Re-run the conversion."
                ) from e
            self.files[n] = f
        if weight_map is not None:
            for name, file in weight_map.items():
                if self.where.get(name) != file:
                    raise CheckpointError(
                        f"{index}: lists {name} in {file}, but that file does not hold it"
                    )
        first = self.files[names[0]].metadata() or {}
        self.metadata: dict[str, str] = {k: v for k, v in first.items() if k != "format"}

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"{self.folder}: no tensor {name}")
        t: torch.Tensor = self.files[self.where[name]].get_tensor(name)
        return t

    def close(self) -> None:
        self.files.clear()


class ShardedWriter:
    """Writes safetensors shards with safetensors.save_file from a plan known in advance (names,
    shapes, dtypes): tensors arrive one at a time and a shard is saved (and fsynced) when its
    last tensor arrives, so memory holds at most one shard (--shard-size), not the model.
    save_file adds nothing to that (safetensors 0.8: saving 1 GiB of fp32 tensors raised peak
    RSS by 0 bytes over holding them), so no hand-written writer is needed."""

    def __init__(
        self, folder: Path, plan: list[TensorInfo], shard_bytes: int, metadata: dict[str, str]
    ) -> None:
        self.folder, self.metadata = folder, metadata
        self.shards: list[list[TensorInfo]] = [[]]
        size = 0
        for info in plan:  # greedy: a tensor bigger than shard_bytes gets a shard of its own
            if self.shards[-1] and size + info.nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(info)
            size += info.nbytes
        n = len(self.shards)
        self.names = (
            [SINGLE_FILE]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._queue = [(i, info) for i, shard in enumerate(self.shards) for info in shard]
        self._next = 0
        self._held: dict[str, torch.Tensor] = {}
        self.total_bytes = sum(i.nbytes for i in plan)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        shard, info = self._queue[self._next]
        if name != info.name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(
                f"writer expected {info}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._held[name] = tensor.contiguous()
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            path = self.folder / self.names[shard]
            save_file(self._held, str(path), metadata=self.metadata)
            self._held = {}
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        if self._next != len(self._queue):
            raise RuntimeError(f"writer closed after {self._next}/{len(self._queue)} tensors")
        if len(self.names) > 1:
            weight_map = {
                info.name: self.names[i] for i, shard in enumerate(self.shards) for info in shard
            }
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._held = {}
