"""Checkpoint conversion: ZeRO-3 checkpoint folders -> consolidated safetensors or Hugging Face
Llama/Mistral folders and back; weight loaders for warm starts and inference; inspect/verify.

    loretta-convert SRC DST --to {safetensors,loretta,hf} [--dtype bf16] [--shard-size 2GB]
    loretta-convert inspect SRC          loretta-convert verify A B

Three folder formats, each usable as a source:

    zero          <run>/checkpoints/step_N/ (ds/ holds every rank's ZeRO-3 partition), also a
                  run dir or its checkpoints/ folder (newest complete step, or --step N)
    consolidated  model.safetensors (or model-0000i-of-0000n.safetensors + index.json) in OUR
                  parameter names, config.yaml (the TrainConfig), layout.json
    hf            config.json, model*.safetensors in Hugging Face Llama/Mistral names,
                  generation_config.json, loretta_config.yaml, loretta_layout.json

How ZeRO-3 stores the weights. Rank r of W writes ``*zero_pp_rank_{r}_mp_rank_00_optim_states.pt``
whose ``fp32_flat_groups`` are 1-D fp32 master weights. Take the parameters in the order of
``param_shapes`` (rank 0's ``*_model_states.pt``) and the groups of a rank concatenated: a parameter
of n elements owns the next ceil(n / W) elements of every rank's flat, rank r holding elements
[r * ceil(n/W), (r+1) * ceil(n/W)) of the flattened parameter (the last rank zero-padded). So a
parameter is W slices at the same offset, one per rank, concatenated, padding dropped.

How we read them. A torch.save file is a zip archive of uncompressed records: ``data.pkl`` (the
object tree) and ``data/<key>`` (raw storage bytes). We unpickle data.pkl with a restricted
unpickler that turns each tensor into a reference (record, offset, shape) and every foreign class
(DeepSpeed's enums and loss scaler) into an inert stub: no DeepSpeed import, no code from the
file runs, no tensor bytes are read. Then each parameter's slices are read with pread into one
buffer, written out, and dropped: memory holds one parameter, not the model, and the rank files
are never mapped (DeepSpeed's zero_to_fp32 holds the whole model and maps every rank file). The
flat records are read front to back, so their zip CRC-32 is checked on the way: a flipped byte in
a rank file is an error, not silently wrong weights.

Output goes to a temporary folder beside DST that is renamed into place when complete.
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import collections
import copyreg
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import yaml

from loretta.configlib import from_dict, to_dict
from loretta.data.format import fsync_dir, replace_dir
from loretta.errors import CheckpointError, DataError, LorettaError
from loretta.model import Decoder
from loretta.model import hf as hf_map
from loretta.model.config import DecoderConfig
from loretta.vocab import VocabLayout

if sys.byteorder != "little":  # safetensors and torch.save data are little-endian
    raise ImportError("loretta.convert supports little-endian machines only")

# safetensors dtype names <-> torch dtypes
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
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# DecoderConfig values that fix the tensors' shapes and meaning (derived ones included)
ARCH_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "hidden_dim")
ARCH_FIELDS_ALL = (*ARCH_FIELDS, "tie_embeddings", "norm_eps", "rope_theta", "sliding_window")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, without a copy (bf16 has no numpy dtype)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def _pread_into(fd: int, buf: memoryview, offset: int, where: Path | str) -> None:
    got = 0
    while got < len(buf):
        try:
            n = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as e:
            raise CheckpointError(f"{where}: read failed at byte {offset + got} ({e})") from e
        if n <= 0:
            raise CheckpointError(
                f"{where}: unexpected end of file at byte {offset + got} (needed "
                f"{len(buf) - got} more bytes); the file is truncated"
            )
        got += n


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000; '500MiB' -> 500 * 2**20; '123' -> 123 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"--shard-size={text!r}: expected a size like 2GB, 500MB or 1GiB")
    unit = m.group(2).rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    size = int(float(m.group(1)) * base**power)
    if size < 1:
        raise ValueError(f"--shard-size={text!r}: must be at least 1 byte")
    return size


# ---- parameter names, shapes and the Hugging Face mapping ------------------------------------
def param_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes, in Decoder.named_parameters() order."""
    d, hd, V, hidden = cfg.dim, cfg.head_dim, cfg.vocab_size, cfg.hidden_dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        out[p + "attention_norm.weight"] = (d,)
        out[p + "attention.wqkv.weight"] = ((cfg.n_heads + 2 * cfg.kv_heads) * hd, d)
        out[p + "attention.wo.weight"] = (d, cfg.n_heads * hd)
        out[p + "ffn_norm.weight"] = (d,)
        out[p + "feed_forward.w13.weight"] = (2 * hidden, d)
        out[p + "feed_forward.w2.weight"] = (d, hidden)
    out["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        out["output.weight"] = (V, d)
    return out


def split_to_hf(name: str, t: torch.Tensor, cfg: DecoderConfig) -> list[tuple[str, torch.Tensor]]:
    """Our tensor -> its Hugging Face pieces (loretta.model.hf): wqkv rows [q | k | v] and w13
    rows [gate | up] become row blocks (contiguous views); other tensors are renamed."""
    return list(hf_map.to_hf(name, t, cfg))


def hf_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes, in our parameter order (planned on the meta device)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in param_shapes(cfg).items():
        for hf_name, piece in split_to_hf(name, torch.empty(shape, device="meta"), cfg):
            out[hf_name] = tuple(piece.shape)
    return out


def hf_config(
    cfg: DecoderConfig, layout: VocabLayout, dtype: torch.dtype, max_positions: int
) -> dict[str, Any]:
    """config.json (loretta.model.hf.hf_config) with the special ids of this layout and the
    trained context length."""
    out = hf_map.hf_config(cfg, str(dtype).removeprefix("torch."))
    out.update(
        bos_token_id=layout.bos_id,
        eos_token_id=layout.eos_id,
        pad_token_id=layout.pad_id,
        max_position_embeddings=max_positions,
        rope_scaling=None,
        use_cache=True,
    )
    return out


def config_from_hf(hf: dict[str, Any], where: str) -> DecoderConfig:
    """A DecoderConfig from a Llama/Mistral config.json; every setting our decoder cannot
    express is listed in one error."""
    problems = []
    if hf.get("model_type") not in ("llama", "mistral"):
        problems.append(f"model_type={hf.get('model_type')!r}: only 'llama' and 'mistral' convert")
    for key, want in (
        ("hidden_act", "silu"),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("rope_scaling", None),
    ):
        if hf.get(key, want) != want:
            problems.append(f"{key}={hf.get(key)!r}: our decoder supports only {want!r}")
    cfg = DecoderConfig()
    try:
        hf = dict(hf)
        if hf.get("model_type") != "mistral":
            hf["sliding_window"] = None  # Llama configs may carry an unused sliding_window
        cfg = hf_map.decoder_config_from_hf(hf)
    except (KeyError, TypeError, ValueError) as e:
        problems.append(f"not a usable Llama/Mistral config ({type(e).__name__}: {e})")
    else:
        problems += cfg.problems()
    if problems:
        raise CheckpointError(f"{where}: cannot convert: " + "; ".join(problems))
    return cfg


def arch_diffs(a: DecoderConfig, b: DecoderConfig, names: tuple[str, ...]) -> list[str]:
    return [
        f"model.{k}: {getattr(a, k)!r} vs {getattr(b, k)!r}"
        for k in names
        if getattr(a, k) != getattr(b, k)
    ]


# ---- config and layout files ----------------------------------------------------------------
def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} unreadable ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a YAML mapping with a 'model' section")
    return data


def model_config_from_yaml(data: dict[str, Any], where: Path) -> DecoderConfig:
    """The `model` section of a TrainConfig YAML (the rest of the file is carried along)."""
    section = data.get("model")
    if not isinstance(section, dict):
        raise CheckpointError(f"{where}: no 'model' section")
    problems: list[str] = []
    cfg = from_dict(DecoderConfig, section, "model", problems)
    if not problems:
        problems += cfg.problems()
        if cfg.vocab_size < 1:
            problems.append(f"model.vocab_size={cfg.vocab_size}: must be resolved (>= 1)")
    if problems:
        raise CheckpointError(f"{where}: bad model config: " + "; ".join(problems))
    return cfg


def read_layout_file(path: Path) -> VocabLayout:
    try:
        return VocabLayout.from_dict(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError, DataError) as e:
        raise CheckpointError(f"{path} unreadable ({e})") from e


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} unreadable ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ---- torch.save archives, read lazily -------------------------------------------------------
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_SAFE_BUILTINS = frozenset(
    "object set frozenset dict list tuple int float complex bool str bytes bytearray slice range".split()
)


class _Stub:
    """Stands in for a class named by a pickle that we do not need (DeepSpeed's ZeroStageEnum,
    LossScaler, ...): it keeps constructor args and state and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype


@dataclass(frozen=True)
class TensorRef:
    """A tensor inside a torch.save archive, not read yet (contiguous: offset + shape)."""

    record: str  # the storage key: zip member <prefix>/data/<record>
    dtype: torch.dtype
    offset: int  # elements into the record
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _rebuild_tensor(
    storage: _StorageRef, offset: int, size: Any, stride: Any, *_rest: Any
) -> TensorRef:
    shape = tuple(int(s) for s in size)
    # C-contiguous: stride[i] == prod(shape[i+1:]) wherever the dim has more than one element
    if any(
        n > 1 and int(st) != math.prod(shape[i + 1 :])
        for i, (n, st) in enumerate(zip(shape, stride))
    ):
        raise pickle.UnpicklingError(f"non-contiguous tensor (shape {shape}, stride {stride})")
    return TensorRef(storage.key, storage.dtype, int(offset), shape)


def _rebuild_from_type(func: Callable[..., Any], _type: Any, args: Any, _state: Any) -> Any:
    return func(*args)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, _Stub):
        obj = cls()
        obj.state = state
        return obj
    return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]


class _LazyUnpickler(pickle.Unpickler):
    _stubs: dict[tuple[str, str], type] = {}  # noqa: RUF012 (a cache shared by instances)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and (
            name in ("Size", "Tensor", "device")
            or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module == "_codecs" and name == "encode":
            return codecs.encode
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(name, (_Stub,), {"__module__": module})
        return self._stubs[key]

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        return _StorageRef(str(key), storage_type.dtype)


class TorchArchive:
    """A torch.save file (zip format) opened for lazy reads: `obj` is the unpickled tree with
    every tensor as a TensorRef; read() fetches bytes with pread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: missing") from e
        except (OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(
                f"{path}: not a complete torch.save archive ({e}); the file is truncated or "
                "corrupt (or was saved in the legacy non-zip format)"
            ) from e
        self.size = path.stat().st_size
        self._infos = {i.filename: i for i in self._zip.infolist()}
        pkl = [n for n in self._infos if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            self._zip.close()
            raise CheckpointError(f"{path}: not a torch.save archive (no data.pkl record)")
        self._prefix = pkl[0][: -len("data.pkl")]
        self._fd = os.open(path, os.O_RDONLY)
        try:
            order = self._infos.get(self._prefix + "byteorder")
            if order is not None and self._zip.read(order) != b"little":
                raise CheckpointError(f"{path}: saved on a big-endian machine; not supported")
            raw = self._zip.read(pkl[0])  # checks the pickle's CRC
            self.obj = _LazyUnpickler(io.BytesIO(raw)).load()
        except CheckpointError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise CheckpointError(
                f"{path}: unreadable object tree ({type(e).__name__}: {e}); the file is corrupt"
            ) from e

    def record(self, key: str) -> tuple[int, int, int]:
        """(file offset of the data, size in bytes, CRC-32) of storage record `key`."""
        info = self._infos.get(f"{self._prefix}data/{key}")
        if info is None:
            raise CheckpointError(f"{self.path}: storage record data/{key} missing; corrupt file")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: record data/{key} is compressed; unsupported")
        head = bytearray(30)
        _pread_into(self._fd, memoryview(head), info.header_offset, self.path)
        if head[:4] != b"PK\x03\x04":
            raise CheckpointError(
                f"{self.path}: bad zip header for record data/{key}; the file is corrupt"
            )
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self.size:
            raise CheckpointError(f"{self.path}: record data/{key} runs past the end; truncated")
        return start, info.file_size, info.CRC

    def read(self, buf: memoryview, offset: int) -> None:
        _pread_into(self._fd, buf, offset, self.path)

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1
        self._zip.close()


class _FlatRecord:
    """One rank's fp32 flat group: a TensorRef in an archive, read mostly front to back so that
    the record's zip CRC-32 can be checked once it has been read completely."""

    def __init__(self, archive: TorchArchive, ref: TensorRef) -> None:
        if ref.dtype != torch.float32:
            raise CheckpointError(f"{archive.path}: fp32 flat group stored as {ref.dtype}")
        self.archive, self.numel = archive, ref.numel
        start, size, self.crc_expected = archive.record(ref.record)
        self.start = start + ref.offset * 4
        if (ref.offset + ref.numel) * 4 > size:
            raise CheckpointError(f"{archive.path}: flat group overruns record {ref.record}")
        # the CRC covers the whole record: checkable when the tensor is the whole record
        self.checkable = ref.offset == 0 and ref.numel * 4 == size
        self.pos, self.crc = 0, 0

    def read(self, elem: int, buf: memoryview) -> None:
        byte = elem * 4
        if self.checkable and byte > self.pos:  # skip forward through bytes we don't need
            self._advance(byte - self.pos)
        if self.checkable and byte == self.pos:
            self.archive.read(buf, self.start + byte)
            self.crc = zlib.crc32(buf, self.crc)
            self.pos += len(buf)
        else:  # random access: this record can no longer be checked
            self.checkable = False
            self.archive.read(buf, self.start + byte)

    def _advance(self, n: int) -> None:
        chunk = bytearray(min(n, 1 << 20))
        while n > 0:
            view = memoryview(chunk)[: min(n, len(chunk))]
            self.archive.read(view, self.start + self.pos)
            self.crc = zlib.crc32(view, self.crc)
            self.pos += len(view)
            n -= len(view)

    def finish(self) -> None:
        if not self.checkable:
            return
        self._advance(self.numel * 4 - self.pos)
        if self.crc != self.crc_expected:
            raise CheckpointError(
                f"{self.archive.path}: fp32 weights fail their CRC-32 check (stored "
                f"{self.crc_expected:08x}, read {self.crc:08x}); the file is corrupt. Convert an "
                "earlier checkpoint."
            )


# ---- sources ----------------------------------------------------------------------------------
class Source:
    """Weights in one of the three formats, read one tensor at a time.

    `raw` tensors are the format's own names (HF names for an HF folder); `ours` are our
    parameter names (HF q/k/v and gate/up fused back)."""

    kind = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model_cfg = DecoderConfig()
        self.layout: VocabLayout | None = None
        self.layout_file: Path | None = None
        self.config_file: Path | None = None
        self.train_config: dict[str, Any] = {}  # the TrainConfig YAML as a dict ({} if none)
        self.info: dict[str, Any] = {}  # step, world size, ...

    def raw_infos(self) -> list[TensorInfo]:
        return self.our_infos()

    def read_raw(self, name: str) -> torch.Tensor:
        return self.read_ours(name)

    def iter_raw(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.iter_ours()

    def our_infos(self) -> list[TensorInfo]:
        raise NotImplementedError

    def read_ours(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def iter_ours(self) -> Iterator[tuple[str, torch.Tensor]]:
        for info in self.our_infos():
            yield info.name, self.read_ours(info.name)

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_names(self, found: dict[str, tuple[int, ...]], where: Path) -> None:
        want = param_shapes(self.model_cfg)
        problems = [f"missing {n} {s}" for n, s in want.items() if n not in found]
        problems += [f"unexpected {n}" for n in found if n not in want]
        problems += [
            f"{n}: shape {found[n]} but the model config needs {s}"
            for n, s in want.items()
            if n in found and tuple(found[n]) != s
        ]
        if problems:
            raise CheckpointError(
                f"{where}: tensors do not match the model config in {self.config_file}: "
                + "; ".join(problems[:10])
                + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
            )


@dataclass(frozen=True)
class _Slot:
    name: str
    shape: tuple[int, ...]
    part: int  # elements per rank, ceil(numel / W)
    offset: int  # where this parameter's part starts in every rank's concatenated flat


class ZeroSource(Source):
    """A ZeRO-3 checkpoint folder step_N/ (ds/ from DeepSpeed's save_checkpoint, tag 'ds')."""

    kind = "zero"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        from loretta.train import checkpoint as ckpt

        state = ckpt.read_state(folder)
        if not state.get("complete"):
            raise CheckpointError(
                f"{folder}/state.json: checkpoint incomplete (interrupted while saving); "
                "convert an earlier step"
            )
        self.config_file, self.layout_file = folder / "config.yaml", folder / "layout.json"
        self.train_config = read_yaml(self.config_file)
        self.model_cfg = model_config_from_yaml(self.train_config, self.config_file)
        self.layout = read_layout_file(self.layout_file)
        ds = folder / "ds"
        if not ds.is_dir():
            raise CheckpointError(f"{ds}: missing; {folder} holds no DeepSpeed state")
        world = int(state.get("world_size") or 0)
        optim = sorted(ds.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
        if world < 1:
            world = len(optim)
        self.world = world
        self.info = {"step": state.get("step"), "world_size": world}
        ranks: dict[int, Path] = {}
        prefix = ""  # "bf16_" when the run trained in bf16
        for p in optim:
            m = re.fullmatch(r"(.*)zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt", p.name)
            if m:
                prefix, ranks[int(m.group(2))] = m.group(1), p
        for r in range(world):
            model_file = ds / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
            if r not in ranks:
                raise CheckpointError(
                    f"{ds}/{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt: missing (rank {r} of "
                    f"{world}); every rank's partition is needed. Copy it back or convert another "
                    "step."
                )
            if not model_file.exists():
                raise CheckpointError(f"{model_file}: missing (rank {r} of {world})")
        extra = sorted(r for r in ranks if r >= world)
        if extra:
            raise CheckpointError(
                f"{ranks[extra[0]]}: rank {extra[0]} but state.json says world_size={world}; "
                "stale files from another run are mixed into this checkpoint"
            )
        self.archives: list[TorchArchive] = []
        try:
            self._slots = self._read_shapes(ds / "zero_pp_rank_0_mp_rank_00_model_states.pt")
            need = sum(s.part for s in self._slots)
            self._groups: list[list[TensorRef]] = []
            for r in range(world):
                self.archives.append(TorchArchive(ranks[r]))
                self._groups.append(self._read_flat_groups(self.archives[-1], r, need))
        except BaseException:
            self.close()
            raise

    def _read_shapes(self, path: Path) -> list[_Slot]:
        arch = TorchArchive(path)
        arch.close()
        obj = arch.obj
        if not isinstance(obj, dict) or "param_shapes" not in obj:
            raise CheckpointError(f"{path}: no param_shapes; not a DeepSpeed model-states file")
        for key in ("frozen_param_shapes", "shared_params", "buffer_names"):
            if obj.get(key):
                raise CheckpointError(
                    f"{path}: has {key}; loretta's Decoder has none, so this is not a loretta "
                    "checkpoint"
                )
        shapes: dict[str, tuple[int, ...]] = {}
        for group in obj["param_shapes"]:
            for name, shape in group.items():
                shapes[str(name)] = tuple(int(s) for s in shape)
        self._check_names(shapes, path)
        slots, offset = [], 0
        for name, shape in shapes.items():  # the order of the flat partitions
            part = -(-math.prod(shape) // self.world)
            slots.append(_Slot(name, shape, part, offset))
            offset += part
        return slots

    def _read_flat_groups(self, arch: TorchArchive, rank: int, need: int) -> list[TensorRef]:
        sd = arch.obj.get("optimizer_state_dict") if isinstance(arch.obj, dict) else None
        if not isinstance(sd, dict) or "fp32_flat_groups" not in sd:
            raise CheckpointError(
                f"{arch.path}: no fp32_flat_groups; not a ZeRO-3 optimizer-state file"
            )
        stage = sd.get("zero_stage")
        stage = stage.args[0] if isinstance(stage, _Stub) and stage.args else stage
        count = sd.get("partition_count")
        count = max(count) if isinstance(count, list) else count
        if stage != 3 or count != self.world:
            raise CheckpointError(
                f"{arch.path}: ZeRO stage {stage} over {count} ranks, but this checkpoint "
                f"should be ZeRO-3 over world_size={self.world} (state.json)"
            )
        groups = list(sd["fp32_flat_groups"])
        if not all(isinstance(g, TensorRef) for g in groups):
            raise CheckpointError(f"{arch.path}: fp32_flat_groups are not tensors")
        have = sum(g.numel for g in groups)
        if have != need:
            raise CheckpointError(
                f"{arch.path}: rank {rank} holds {have} fp32 elements but the parameter shapes "
                f"need {need} (ceil(numel / {self.world}) each); the files do not belong together"
            )
        return groups

    def our_infos(self) -> list[TensorInfo]:
        return [TensorInfo(s.name, s.shape, torch.float32) for s in self._slots]

    def _gather(self, slot: _Slot, readers: list[list[_FlatRecord]]) -> torch.Tensor:
        """Read the W slices of one parameter into one buffer: (W * part,) -> shape."""
        buf = torch.empty(self.world * slot.part, dtype=torch.float32)
        raw = _bytes_view(buf)
        for r, records in enumerate(readers):
            dst = raw[r * slot.part * 4 : (r + 1) * slot.part * 4]
            elem, done = slot.offset, 0
            for rec in records:  # a slice may span two groups (records) of a rank
                if elem >= rec.numel:
                    elem -= rec.numel
                    continue
                n = min(slot.part - done, rec.numel - elem)
                rec.read(elem, dst[done * 4 : (done + n) * 4])
                done, elem = done + n, 0
                if done == slot.part:
                    break
        return buf[: math.prod(slot.shape)].view(slot.shape)

    def _readers(self) -> list[list[_FlatRecord]]:
        return [[_FlatRecord(a, g) for g in gs] for a, gs in zip(self.archives, self._groups)]

    def iter_ours(self) -> Iterator[tuple[str, torch.Tensor]]:
        readers = self._readers()
        for slot in self._slots:
            yield slot.name, self._gather(slot, readers)
        for records in readers:
            for rec in records:
                rec.finish()

    def read_ours(self, name: str) -> torch.Tensor:
        slot = next((s for s in self._slots if s.name == name), None)
        if slot is None:
            raise KeyError(name)
        return self._gather(slot, self._readers())

    def close(self) -> None:
        for a in self.archives:
            a.close()


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size; tensors read
    with pread (never mapped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: {len(head)} bytes; truncated (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(self.size - 8, 100 << 20):
                    raise CheckpointError(f"{path}: header length {n} is impossible; corrupt")
                header = json.loads(f.read(n))
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: missing") from e
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[TensorInfo, int]] = {}
        end = 0
        for name, entry in header.items():
            try:
                dtype = ST_DTYPES[entry["dtype"]]
                begin, stop = (int(x) for x in entry["data_offsets"])
                info = TensorInfo(name, tuple(int(s) for s in entry["shape"]), dtype)
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{path}: bad header entry {name!r} ({err!r})") from err
            if stop - begin != info.nbytes:
                raise CheckpointError(f"{path}: {name} has {stop - begin} bytes for {info}")
            self.entries[name] = (info, begin)
            end = max(end, stop)
        if self.data_start + end != self.size:
            raise CheckpointError(
                f"{path}: the header describes {self.data_start + end} bytes but the file has "
                f"{self.size}; the file is truncated or corrupt. Re-run the conversion."
            )
        self._fd = -1

    def read(self, name: str) -> torch.Tensor:
        info, begin = self.entries[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
        _pread_into(self._fd, _bytes_view(out), self.data_start + begin, self.path)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SafetensorsFolder:
    """model.safetensors, or shards listed by model.safetensors.index.json."""

    def __init__(self, folder: Path) -> None:
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
        self.files = {n: SafetensorsFile(folder / n) for n in names}
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for name in f.entries:
                self.where[name] = f
        if weight_map is not None:
            for name, file in weight_map.items():
                if self.where.get(name) is not self.files[file]:
                    raise CheckpointError(
                        f"{index}: lists {name} in {file}, but that file does not hold it"
                    )

    def infos(self) -> list[TensorInfo]:
        return [f.entries[n][0] for f in self.files.values() for n in f.entries]

    def read(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"{self.folder}: no tensor {name}")
        return self.where[name].read(name)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class ConsolidatedSource(Source):
    kind = "consolidated"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.config_file, self.layout_file = folder / "config.yaml", folder / "layout.json"
        self.train_config = read_yaml(self.config_file)
        self.model_cfg = model_config_from_yaml(self.train_config, self.config_file)
        self.layout = read_layout_file(self.layout_file)
        self.st = SafetensorsFolder(folder)
        self._infos = self.st.infos()
        self._check_names({i.name: i.shape for i in self._infos}, folder)
        order = {n: i for i, n in enumerate(param_shapes(self.model_cfg))}
        self._infos.sort(key=lambda i: order[i.name])
        first = next(iter(self.st.files.values()))
        self.info = {k: v for k, v in first.metadata.items() if k != "format"}

    def our_infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read_ours(self, name: str) -> torch.Tensor:
        return self.st.read(name)

    def close(self) -> None:
        self.st.close()


class HFSource(Source):
    kind = "hf"

    def __init__(self, folder: Path, layout_file: Path | None = None) -> None:
        super().__init__(folder)
        hf = read_json(folder / "config.json")
        cfg = config_from_hf(hf, str(folder / "config.json"))
        ours = folder / "loretta_config.yaml"
        if ours.exists():
            self.config_file = ours
            self.train_config = read_yaml(ours)
            mine = model_config_from_yaml(self.train_config, ours)
            diffs = arch_diffs(mine, cfg, ARCH_FIELDS_ALL)
            if diffs:
                raise CheckpointError(
                    f"{ours} disagrees with {folder / 'config.json'}: {'; '.join(diffs)}; "
                    "one of them was edited by hand"
                )
            cfg = mine  # keeps settings HF cannot express (attn_backend, dropout, ...)
        else:
            self.config_file = folder / "config.json"
            self.train_config = {"model": to_dict(cfg)}
        self.model_cfg = cfg
        self.layout_file = layout_file or folder / "loretta_layout.json"
        self.layout = read_layout_file(self.layout_file) if self.layout_file.exists() else None
        self.st = SafetensorsFolder(folder)
        want = hf_shapes(cfg)
        found = {i.name: i for i in self.st.infos()}
        if cfg.tie_embeddings:
            found.pop("lm_head.weight", None)  # some exporters save the tied copy too
        problems = [f"missing {n} {s}" for n, s in want.items() if n not in found]
        problems += [f"unexpected {n}" for n in found if n not in want]
        problems += [
            f"{n}: shape {found[n].shape}, config.json needs {s}"
            for n, s in want.items()
            if n in found and found[n].shape != s
        ]
        if problems:
            raise CheckpointError(
                f"{folder}: tensors do not match config.json: " + "; ".join(problems[:10])
            )
        self._raw = [found[n] for n in want]
        self._groups = dict(hf_map.hf_groups(cfg))  # our name -> HF names, in row order
        first = next(iter(self.st.files.values()))
        self.info = {k: v for k, v in first.metadata.items() if k != "format"}
        self.info["architecture"] = (hf.get("architectures") or ["?"])[0]

    def raw_infos(self) -> list[TensorInfo]:
        return list(self._raw)

    def read_raw(self, name: str) -> torch.Tensor:
        return self.st.read(name)

    def iter_raw(self) -> Iterator[tuple[str, torch.Tensor]]:
        for info in self._raw:
            yield info.name, self.st.read(info.name)

    def our_infos(self) -> list[TensorInfo]:
        dtypes = {i.name: i.dtype for i in self._raw}
        return [
            TensorInfo(n, s, dtypes[self._groups[n][0]])
            for n, s in param_shapes(self.model_cfg).items()
        ]

    def read_ours(self, name: str) -> torch.Tensor:
        parts = [self.st.read(hf) for hf in self._groups[name]]
        if len({p.dtype for p in parts}) > 1:
            raise CheckpointError(f"{self.path}: the pieces of {name} have different dtypes")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def close(self) -> None:
        self.st.close()


def resolve_zero(path: Path, step: int | None) -> Path | None:
    """The step folder meant by a step folder, a checkpoints/ folder or a run dir; None when
    `path` is none of them."""
    from loretta.train import checkpoint as ckpt

    if (path / "state.json").exists() and (path / "ds").exists():
        if step is not None and path.name != ckpt.step_dir(path.parent, step).name:
            raise CheckpointError(f"--step {step} conflicts with the step folder {path}")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = [p for p in root.iterdir() if ckpt.STEP_RE.match(p.name)] if root.is_dir() else []
    if not steps and not (root / "latest").exists():
        return None
    if step is not None:
        folder = ckpt.step_dir(root, step)
        if not folder.is_dir():
            have = ", ".join(p.name for p in sorted(steps)) or "none"
            raise CheckpointError(f"{folder}: no such checkpoint (have: {have})")
        return folder
    found = ckpt.latest_complete(root)
    if found is None:
        raise CheckpointError(f"{root}: no complete checkpoint inside")
    return found


def open_source(path: str | Path, step: int | None = None, layout: Path | None = None) -> Source:
    """Open a ZeRO-3 checkpoint, consolidated folder or Hugging Face folder for reading."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    zero = resolve_zero(path, step)
    if zero is not None:
        return ZeroSource(zero)
    if step is not None:
        raise CheckpointError(f"--step {step}: {path} is not a run or checkpoints folder")
    if (path / "config.json").exists():
        return HFSource(path, layout)
    if (path / "config.yaml").exists():
        return ConsolidatedSource(path)
    raise CheckpointError(
        f"{path}: not a checkpoint folder (state.json + ds/), a run dir, a consolidated export "
        "(config.yaml + layout.json + model*.safetensors) or a Hugging Face folder (config.json)"
    )


# ---- writing ----------------------------------------------------------------------------------
class ShardedWriter:
    """Writes safetensors shards from a plan known in advance (names, shapes, dtypes), so each
    header is written first and tensors are streamed into place one at a time."""

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
        self._file: Any = None
        self.total_bytes = sum(i.nbytes for i in plan)

    def _open(self, shard: int) -> None:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for info in self.shards[shard]:
            header[info.name] = {
                "dtype": ST_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as safetensors does
        self._file = open(self.folder / self.names[shard], "wb")  # closed in _close()
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, info = self._queue[self._next]
        if name != info.name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(
                f"writer expected {info}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._file is None:
            self._open(shard)
        self._file.write(_bytes_view(tensor.contiguous()))
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._close()

    def close(self) -> None:
        if self._next != len(self._queue):
            self._close()
            raise RuntimeError(f"writer closed after {self._next}/{len(self._queue)} tensors")
        if len(self.names) > 1:
            weight_map = {
                info.name: self.names[i] for i, shard in enumerate(self.shards) for info in shard
            }
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an existing DST (with overwrite) is replaced."""
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
    replace_dir(tmp, dst)


def _progress(total: int, desc: str, enabled: bool | None) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        disable=None if enabled is None else not enabled,
        file=sys.stderr,
    )


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    dtype: str | None = None,
    shard_size: int = 2 * 10**9,
    step: int | None = None,
    overwrite: bool = False,
    layout: str | Path | None = None,
    progress: bool | None = None,
) -> Path:
    """Convert SRC (any format) to DST: 'safetensors'/'loretta' (consolidated, our names) or
    'hf'. dtype None keeps the source dtype (fp32 for ZeRO master weights)."""
    dst = Path(dst)
    if to not in ("safetensors", "loretta", "hf"):
        raise CheckpointError(f"--to {to!r}: choose safetensors (= loretta) or hf")
    if dtype is not None and dtype not in OUT_DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {sorted(OUT_DTYPES)}")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
    with open_source(src, step, Path(layout) if layout else None) as source:
        if source.layout is None:
            raise CheckpointError(
                f"{source.path}: no vocabulary layout ({source.layout_file} missing); pass "
                "--layout layout.json (the one the model was trained with)"
            )
        if dst.resolve() == source.path.resolve():
            raise CheckpointError(f"{dst}: the destination is the source folder")
        cfg, hf = source.model_cfg, to == "hf"
        out_dtype = OUT_DTYPES[dtype] if dtype else None
        plan: list[TensorInfo] = []
        for info in source.our_infos():
            dt = out_dtype or info.dtype
            meta_t = torch.empty(info.shape, device="meta")
            pieces = split_to_hf(info.name, meta_t, cfg) if hf else [(info.name, meta_t)]
            plan += [TensorInfo(n, tuple(p.shape), dt) for n, p in pieces]
        meta = {"format": "pt", "loretta": "hf" if hf else "consolidated", "source": source.kind}
        meta.update({k: str(v) for k, v in source.info.items()})
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        writer = ShardedWriter(tmp, plan, shard_size, meta)
        try:
            with _progress(writer.total_bytes, f"{source.kind} -> {to}", progress) as bar:
                for name, t in source.iter_ours():
                    t = t.to(out_dtype) if out_dtype else t
                    for piece_name, piece in split_to_hf(name, t, cfg) if hf else [(name, t)]:
                        writer.write(piece_name, piece)
                    bar.update(t.numel() * t.element_size())
            writer.close()
            _write_side_files(tmp, source, hf, out_dtype or plan[0].dtype)
            fsync_dir(tmp)
            _publish(tmp, dst, overwrite)
        except BaseException:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dst


def _write_side_files(folder: Path, source: Source, hf: bool, dtype: torch.dtype) -> None:
    assert source.layout is not None
    layout_json = json.dumps(source.layout.to_dict(), indent=1) + "\n"
    config_yaml = (
        source.config_file.read_text()
        if source.config_file is not None and source.config_file.suffix == ".yaml"
        else yaml.safe_dump(source.train_config, sort_keys=False)
    )
    if not hf:
        (folder / "config.yaml").write_text(config_yaml)
        (folder / "layout.json").write_text(layout_json)
        return
    data = source.train_config.get("data")
    seq_len = data.get("seq_len") if isinstance(data, dict) else None
    max_pos = int(seq_len) if isinstance(seq_len, int) else 2048
    config = hf_config(source.model_cfg, source.layout, dtype, max_pos)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {
        "bos_token_id": source.layout.bos_id,
        "eos_token_id": source.layout.eos_id,
        "pad_token_id": source.layout.pad_id,
    }
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (folder / "loretta_config.yaml").write_text(config_yaml)
    (folder / "loretta_layout.json").write_text(layout_json)


# ---- loading for training and inference -----------------------------------------------------
def check_init_source(path: str | Path, model_cfg: DecoderConfig, layout: VocabLayout) -> Source:
    """Open a warm-start source and check its layout and architecture against this run's (reads
    headers only). Raises CheckpointError naming the file and the differences."""
    src = open_source(path)
    try:
        if src.layout is None:
            raise CheckpointError(
                f"checkpoint.init_from={str(path)!r}: {src.layout_file} missing; the vocabulary "
                "layout is needed to know what the token ids mean"
            )
        try:
            src.layout.check_same(layout, str(src.layout_file), "this run's training data")
        except DataError as e:
            raise CheckpointError(f"checkpoint.init_from={str(path)!r}: {e}") from e
        diffs = arch_diffs(src.model_cfg, model_cfg, (*ARCH_FIELDS, "tie_embeddings"))
        if diffs:
            raise CheckpointError(
                f"checkpoint.init_from={str(path)!r}: {src.config_file} (left) holds a different "
                f"model from this run's config (right): {'; '.join(diffs)}. Set the same model.* "
                "values, or drop checkpoint.init_from."
            )
        notes = arch_diffs(src.model_cfg, model_cfg, ("norm_eps", "rope_theta", "sliding_window"))
        if notes:
            print(
                f"[loretta] warm start from {path}: {'; '.join(notes)} (export vs this run); "
                "the weights load, but the model computes a different function",
                file=sys.stderr,
            )
    except BaseException:
        src.close()
        raise
    return src


def load_for_init(
    path: str | Path, model_cfg: DecoderConfig, layout: VocabLayout
) -> dict[str, torch.Tensor]:
    """Initial weights for a new run at any world size, from a consolidated folder, an HF folder
    or a ZeRO-3 checkpoint: CPU tensors in our parameter names, in the stored dtype."""
    with check_init_source(path, model_cfg, layout) as src:
        return dict(src.iter_ours())


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    step: int | None = None,
) -> tuple[Decoder, VocabLayout]:
    """(Decoder in eval mode, vocabulary layout) from a checkpoint step folder (or run dir), a
    consolidated folder or an HF folder; dtype None keeps the stored dtype."""
    with open_source(path, step) as src:
        if src.layout is None:
            raise CheckpointError(f"{path}: {src.layout_file} missing; cannot interpret tokens")
        state = {n: t.to(dtype) if dtype else t for n, t in src.iter_ours()}
        with torch.device("meta"):  # no memory for a second copy of the weights
            model = Decoder(src.model_cfg)
        model.load_state_dict(state, strict=True, assign=True)
        device = torch.device(device)
        model.to(device)
        model.set_backend(src.model_cfg.attn_backend, device)
        return model.eval(), src.layout


# ---- inspect and verify ----------------------------------------------------------------------
def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes in its stored dtype (C order, little-endian), 16 hex."""
    return hashlib.sha256(_bytes_view(t.contiguous())).hexdigest()[:16]


def inspect(path: str | Path, step: int | None = None, checksums: bool = True) -> dict[str, Any]:
    """Metadata and every tensor (name, shape, dtype, sha256) of a checkpoint of any format, in
    the format's own names, listed in model order."""
    with open_source(path, step) as src:
        tensors = []
        stream = src.iter_raw() if checksums else ((i.name, None) for i in src.raw_infos())
        infos = {i.name: i for i in src.raw_infos()}
        for name, t in stream:
            row: dict[str, Any] = {
                "name": name,
                "shape": list(infos[name].shape),
                "dtype": str(infos[name].dtype).removeprefix("torch."),
            }
            if t is not None:
                row["sha256"] = tensor_digest(t)
            tensors.append(row)
        # list in model order whatever the storage order (ZeRO stores by parameter group)
        names = hf_shapes(src.model_cfg) if src.kind == "hf" else param_shapes(src.model_cfg)
        rank = {n: i for i, n in enumerate(names)}
        tensors.sort(key=lambda r: rank.get(r["name"], len(rank)))
        return {
            "path": str(src.path),
            "kind": src.kind,
            **src.info,
            "model": {k: getattr(src.model_cfg, k) for k in ARCH_FIELDS_ALL},
            "layout": src.layout.names if src.layout else None,
            "params": sum(math.prod(r["shape"]) for r in tensors),
            "tensors": tensors,
        }


def verify(
    a: str | Path, b: str | Path, atol: float = 0.0, step: int | None = None
) -> dict[str, Any]:
    """Compare two checkpoints of any formats tensor by tensor, in our parameter names. atol 0
    means bitwise equal (values and dtype); otherwise max |a - b| <= atol in fp32."""
    with open_source(a, step) as sa, open_source(b) as sb:
        problems: list[str] = []
        if sa.layout and sb.layout and sa.layout != sb.layout:
            problems.append("vocabulary layouts differ")
        problems += arch_diffs(sa.model_cfg, sb.model_cfg, (*ARCH_FIELDS, "tie_embeddings"))
        infos_b = {i.name: i for i in sb.our_infos()}
        names_a = [i.name for i in sa.our_infos()]
        problems += [f"{n}: only in {b}" for n in infos_b if n not in names_a]
        rows = []
        for name, ta in sa.iter_ours():
            if name not in infos_b:
                problems.append(f"{name}: only in {a}")
                continue
            tb = sb.read_ours(name)
            if ta.shape != tb.shape:
                problems.append(f"{name}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
                continue
            diff = (ta.float() - tb.float()).abs().max().item() if ta.numel() else 0.0
            same = ta.dtype == tb.dtype and torch.equal(ta, tb)
            ok = same if atol == 0 else diff <= atol
            rows.append({"name": name, "max_abs_diff": diff, "bitwise_equal": same, "ok": ok})
            if not ok:
                problems.append(
                    f"{name}: max |a-b| = {diff:.3g}"
                    + ("" if ta.dtype == tb.dtype else f" ({ta.dtype} vs {tb.dtype})")
                )
        return {
            "a": str(sa.path),
            "b": str(sb.path),
            "kinds": [sa.kind, sb.kind],
            "match": not problems,
            "problems": problems,
            "tensors": rows,
        }


# ---- command line ---------------------------------------------------------------------------
def _convert_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="loretta-convert",
        description="Convert loretta checkpoints: ZeRO-3 folder -> consolidated safetensors or "
        "Hugging Face Llama/Mistral, and back. Also: 'loretta-convert inspect SRC', "
        "'loretta-convert verify A B'.",
    )
    ap.add_argument("src", help="checkpoint step folder, run dir, consolidated or HF folder")
    ap.add_argument("dst", help="output folder (written beside it, renamed when complete)")
    ap.add_argument(
        "--to",
        required=True,
        choices=["safetensors", "loretta", "hf"],
        help="safetensors (= loretta): our names + config.yaml + layout.json; hf: transformers",
    )
    ap.add_argument("--dtype", choices=sorted(OUT_DTYPES), default=None, help="default: source's")
    ap.add_argument("--shard-size", default="2GB", help="max bytes per safetensors file")
    ap.add_argument("--step", type=int, default=None, help="step to convert (run/checkpoints dir)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ap.add_argument("--layout", default=None, help="layout.json for an HF folder that has none")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = argv[0] if argv and argv[0] in ("inspect", "verify", "convert") else "convert"
    args_in = argv[1:] if argv and argv[0] == cmd else argv
    try:
        if cmd == "inspect":
            ap = argparse.ArgumentParser(prog="loretta-convert inspect")
            ap.add_argument("src")
            ap.add_argument("--step", type=int, default=None)
            ap.add_argument("--json", action="store_true", help="print one JSON object")
            ap.add_argument("--no-checksum", action="store_true", help="headers only (fast)")
            a = ap.parse_args(args_in)
            report = inspect(a.src, a.step, checksums=not a.no_checksum)
            if a.json:
                print(json.dumps(report))
            else:
                _print_inspect(report)
            return 0
        if cmd == "verify":
            ap = argparse.ArgumentParser(prog="loretta-convert verify")
            ap.add_argument("a")
            ap.add_argument("b")
            ap.add_argument("--atol", type=float, default=0.0, help="0: bitwise (default)")
            ap.add_argument("--step", type=int, default=None, help="step of A (run dir)")
            ap.add_argument("--json", action="store_true")
            a = ap.parse_args(args_in)
            report = verify(a.a, a.b, a.atol, a.step)
            if a.json:
                print(json.dumps(report))
            else:
                for p in report["problems"]:
                    print(f"MISMATCH {p}")
                n = len(report["tensors"])
                verdict = "match" if report["match"] else "DIFFER"
                print(
                    f"{verdict}: {report['kinds'][0]} {report['a']} vs {report['kinds'][1]} "
                    f"{report['b']} ({n} tensors compared, atol={a.atol})"
                )
            return 0 if report["match"] else 1
        a = _convert_parser().parse_args(args_in)
        try:
            shard = parse_size(a.shard_size)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        out = convert(
            a.src,
            a.dst,
            a.to,
            a.dtype,
            shard,
            a.step,
            a.overwrite,
            a.layout,
            False if a.no_progress else None,
        )
        print(f"wrote {out}", file=sys.stderr)
        return 0
    except LorettaError as e:
        print(f"loretta-convert: error: {e}", file=sys.stderr)
        return 2


def _print_inspect(r: dict[str, Any]) -> None:
    head = {k: v for k, v in r.items() if k not in ("tensors",)}
    for k, v in head.items():
        print(f"{k}: {v}")
    width = max((len(t["name"]) for t in r["tensors"]), default=4)
    for t in r["tensors"]:
        shape = "x".join(str(s) for s in t["shape"])
        print(f"  {t['name']:<{width}}  {shape:>14}  {t['dtype']:<8}  {t.get('sha256', '')}")


if __name__ == "__main__":
    sys.exit(main())
