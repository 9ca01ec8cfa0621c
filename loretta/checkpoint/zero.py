"""ZeRO-3 step folders (``<run>/checkpoints/step_N/``, DeepSpeed's files under ``ds/``, tag
``ds``) read as our parameters, one parameter at a time.

How ZeRO-3 stores the weights. Rank r of W writes ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt``
whose ``fp32_flat_groups`` are 1-D fp32 master weights. Take the parameters in the order of
``param_shapes`` (rank 0's ``*_model_states.pt``) and a rank's groups concatenated: a parameter
of n elements owns the next ceil(n / W) elements of every rank's flat, rank r holding elements
[r * ceil(n/W), (r+1) * ceil(n/W)) of the flattened parameter (the last rank zero-padded). So a
parameter is W slices at the same offset, one per rank, concatenated, padding dropped.

How we read them. Every rank file is opened with ``torch.load(mmap=True, weights_only=True)``
(io.load_torch_archive): the flat groups are views of the mapped files and nothing is read until
a parameter is gathered. Each parameter's W slices are copied into one buffer, handed on, and
the mapped pages just read are released (madvise DONTNEED), so resident memory holds about one
parameter (plus the shard being written), not the model; DeepSpeed's zero_to_fp32 holds the
whole model. The flat groups are read front to back, so each one's CRC-32 is computed on the
way (on a worker thread, overlapping the reads) and compared with its zip record's: a flipped
byte in a rank file is an error, not silently wrong weights (torch.load's mapping checks
nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import re
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from loretta.checkpoint.hf import model_config_from_yaml
from loretta.checkpoint.io import (
    ForeignObject,
    TensorInfo,
    bytes_view,
    load_torch_archive,
    read_layout_file,
    read_yaml,
    record_crcs,
)
from loretta.checkpoint.source import Source
from loretta.errors import CheckpointError
from loretta.train import checkpoint as ckpt

_MADV_DONTNEED = 4
_libc: Any = None
if sys.platform == "linux":
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        _libc = None


def _file_backed(path: Path, t: torch.Tensor) -> bool:
    """Whether tensor `t` lies in a mapping of file `path` (/proc/self/maps): only then may its
    pages be released, since releasing anonymous memory would lose the data."""
    if _libc is None or t.numel() == 0:
        return False
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    target, ends = str(path.resolve()), (t.data_ptr(), t.data_ptr() + t.numel() * 4 - 1)
    found = 0
    for line in maps:
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        for a in ends:
            if lo <= a < hi and len(parts) == 6 and parts[5] == target:
                found += 1
    return found == 2


def _release(addr: int, end: int) -> None:
    """Drop the whole pages of mapped file bytes [addr, end) from this process's resident set.
    The mapping is private and never written, so a later access re-reads the file: only
    memory use changes, never data."""
    start = -(-addr // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = end // mmap.PAGESIZE * mmap.PAGESIZE
    if _libc is not None and stop > start:
        _libc.madvise(start, stop - start, _MADV_DONTNEED)


class _Crc:
    """CRC-32s computed on one worker thread, in submission order, while the main thread reads
    on (zlib releases the GIL): the check costs a second core's time, not wall time. At most
    `lag` buffers wait, so memory stays bounded."""

    def __init__(self, lag: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loretta-crc")
        self._pending: deque[Future[None]] = deque()
        self._lag = lag

    def submit(self, fn: Callable[[], None]) -> None:
        self._pending.append(self._pool.submit(fn))
        while len(self._pending) > self._lag:
            self._pending.popleft().result()

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _FlatReader:
    """One fp32 flat group of one rank (a view of the mapped rank file), read front to back so
    that its zip record's CRC-32 can be checked once it has been read completely."""

    def __init__(
        self, path: Path, flat: torch.Tensor, crcs: dict[int, set[int]], worker: _Crc
    ) -> None:
        self.path, self.flat, self.numel, self.worker = path, flat, flat.numel(), worker
        nbytes = flat.untyped_storage().nbytes()
        # the CRC covers the whole record: checkable when the tensor is the whole record
        self.checkable = flat.storage_offset() == 0 and self.numel * 4 == nbytes
        self.expected = crcs.get(nbytes, set())
        self.pos, self.crc = 0, 0
        self.released = flat.data_ptr()
        self.releasable = _file_backed(path, flat)

    def _update(self, data: torch.Tensor) -> None:
        self.crc = zlib.crc32(bytes_view(data), self.crc)

    def read(self, elem: int, dst: torch.Tensor) -> None:
        n = dst.numel()
        if self.checkable and elem > self.pos:  # skip forward through elements we don't need
            self._advance(elem - self.pos)
        dst.copy_(self.flat[elem : elem + n])
        if self.checkable and elem == self.pos:
            self.worker.submit(partial(self._update, dst))  # dst is never written again
            self.pos += n
        else:  # random access: this record can no longer be checked
            self.checkable = False
        end = self.flat.data_ptr() + (elem + n) * 4
        if self.releasable and end > self.released:
            _release(self.released, end)
            self.released = end

    def _advance(self, n: int) -> None:
        chunk = 1 << 18
        while n > 0:
            k = min(n, chunk)
            self.read(self.pos, torch.empty(k, dtype=torch.float32))
            n -= k

    def finish(self) -> None:
        """Read what is left and compare the CRC (call worker.wait() first)."""
        if not self.checkable:
            return
        self._advance(self.numel - self.pos)
        self.worker.wait()
        if self.crc not in self.expected:
            raise CheckpointError(
                f"{self.path}: fp32 weights fail their CRC-32 check (read {self.crc:08x}, "
                "not the stored value); the file is corrupt. Convert an earlier checkpoint."
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
        self.world = world = world if world >= 1 else len(optim)
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
        self._slots = self._read_shapes(ds / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        need = sum(s.part for s in self._slots)
        self._files = [ranks[r] for r in range(world)]
        self._groups = [self._read_flat_groups(ranks[r], r, need) for r in range(world)]
        self._crcs = [record_crcs(p) for p in self._files]

    def _read_shapes(self, path: Path) -> list[_Slot]:
        obj = load_torch_archive(path)
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
        self.check_names(shapes, path)
        slots, offset = [], 0
        for name, shape in shapes.items():  # the order of the flat partitions
            part = -(-math.prod(shape) // self.world)
            slots.append(_Slot(name, shape, part, offset))
            offset += part
        return slots

    def _read_flat_groups(self, path: Path, rank: int, need: int) -> list[torch.Tensor]:
        obj = load_torch_archive(path)
        sd = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
        if not isinstance(sd, dict) or "fp32_flat_groups" not in sd:
            raise CheckpointError(f"{path}: no fp32_flat_groups; not a ZeRO-3 optimizer-state file")
        stage = sd.get("zero_stage")
        stage = stage.args[0] if isinstance(stage, ForeignObject) and stage.args else stage
        count = sd.get("partition_count")
        count = max(count) if isinstance(count, list) else count
        if stage != 3 or count != self.world:
            raise CheckpointError(
                f"{path}: ZeRO stage {stage} over {count} ranks, but this checkpoint "
                f"should be ZeRO-3 over world_size={self.world} (state.json)"
            )
        groups = list(sd["fp32_flat_groups"])
        if not all(isinstance(g, torch.Tensor) and g.dim() == 1 for g in groups):
            raise CheckpointError(f"{path}: fp32_flat_groups are not 1-D tensors")
        if any(g.dtype != torch.float32 for g in groups):
            raise CheckpointError(f"{path}: fp32 flat group stored as {groups[0].dtype}")
        have = sum(g.numel() for g in groups)
        if have != need:
            raise CheckpointError(
                f"{path}: rank {rank} holds {have} fp32 elements but the parameter shapes "
                f"need {need} (ceil(numel / {self.world}) each); the files do not belong together"
            )
        return groups

    def our_infos(self) -> list[TensorInfo]:
        return [TensorInfo(s.name, s.shape, torch.float32) for s in self._slots]

    def _gather(self, slot: _Slot, readers: list[list[_FlatReader]]) -> torch.Tensor:
        """Read the W slices of one parameter into one buffer: (W * part,) -> shape."""
        buf = torch.empty(self.world * slot.part, dtype=torch.float32)
        for r, records in enumerate(readers):
            dst = buf[r * slot.part : (r + 1) * slot.part]
            elem, done = slot.offset, 0
            for rec in records:  # a slice may span two groups of a rank
                if elem >= rec.numel:
                    elem -= rec.numel
                    continue
                n = min(slot.part - done, rec.numel - elem)
                rec.read(elem, dst[done : done + n])
                done, elem = done + n, 0
                if done == slot.part:
                    break
        return buf[: math.prod(slot.shape)].view(slot.shape)

    def _readers(self, worker: _Crc) -> list[list[_FlatReader]]:
        return [
            [_FlatReader(p, g, crcs, worker) for g in gs]
            for p, gs, crcs in zip(self._files, self._groups, self._crcs)
        ]

    def iter_ours(self) -> Iterator[tuple[str, torch.Tensor]]:
        worker = _Crc()
        try:
            readers = self._readers(worker)
            for slot in self._slots:
                yield slot.name, self._gather(slot, readers)
            for records in readers:
                for rec in records:
                    rec.finish()
        finally:
            worker.close()

    def read_ours(self, name: str) -> torch.Tensor:
        slot = next((s for s in self._slots if s.name == name), None)
        if slot is None:
            raise KeyError(name)
        worker = _Crc()
        try:
            return self._gather(slot, self._readers(worker))
        finally:
            worker.close()

    def close(self) -> None:
        self._groups = []  # drop the views; the mappings go with the last reference


def resolve_zero(path: Path, step: int | None) -> Path | None:
    """The step folder meant by a step folder, a checkpoints/ folder or a run dir; None when
    `path` is none of them."""
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
