"""Self-describing checkpoint folders, written atomically.

    <run_dir>/checkpoints/
      latest                  name of the newest complete checkpoint (written last, atomically)
      step_00000100/
        ds/                   DeepSpeed ZeRO state (every rank's partition)
        universal/            DeepSpeed universal checkpoint (made on demand, for a new world size)
        rng/rank_00000.pt     every rank's RNG states
        config.yaml           the resolved TrainConfig
        layout.json           the vocabulary layout
        state.json            step, tokens, world size, data-loader state, wandb id; "complete": true

All ranks write into ``.step_N.tmp/``; rank 0 renames it to ``step_N/`` after a barrier, then
updates ``latest`` and prunes old folders. A crash at any point leaves the previous checkpoint
untouched, and ``resume: auto`` picks the newest folder whose state.json says complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from loretta.config import TrainConfig, config_from_dict
from loretta.configlib import to_dict
from loretta.data.format import atomic_write_bytes, atomic_write_json, fsync_dir, replace_dir
from loretta.errors import CheckpointError
from loretta.model.config import RUNTIME_FIELDS
from loretta.vocab import VocabLayout

STEP_RE = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 1


def checkpoints_dir(cfg: TrainConfig) -> Path:
    return cfg.run.path / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def is_complete(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "state.json").read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def list_complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_complete(root: Path) -> Path | None:
    ptr = root / "latest"
    if ptr.exists():
        cand = root / ptr.read_text().strip()
        if cand.is_dir() and is_complete(cand):
            newer = [p for p in list_complete(root) if p.name > cand.name]
            return newer[-1] if newer else cand
    done = list_complete(root)
    return done[-1] if done else None


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh start."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode == "auto":
        return latest_complete(checkpoints_dir(cfg))
    path = Path(mode)
    if path.is_dir() and not STEP_RE.match(path.name) and (path / "latest").exists():
        found = latest_complete(path)  # a checkpoints/ folder: take its newest
        if found is None:
            raise CheckpointError(f"checkpoint.resume={mode!r}: no complete checkpoint inside")
        return found
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint.resume={mode!r}: no such folder; use auto, none, or a step_N folder"
        )
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint.resume={mode!r}: the checkpoint is incomplete (no state.json with "
            "complete=true): it was interrupted while saving; pick an earlier one"
        )
    return path


def read_state(folder: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{folder}/state.json unreadable ({e}); the checkpoint is corrupt"
        ) from e
    return state


def read_layout(folder: Path) -> VocabLayout:
    try:
        return VocabLayout.from_dict(json.loads((folder / "layout.json").read_text()), str(folder))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/layout.json unreadable ({e})") from e


def read_config(folder: Path) -> TrainConfig:
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{folder}/config.yaml unreadable ({e})") from e
    return config_from_dict(data, f"{folder}/config.yaml")


def check_compatible(folder: Path, cfg: TrainConfig, layout: VocabLayout) -> dict[str, Any]:
    """Refuse a checkpoint whose model or vocabulary differs from this run's."""
    state = read_state(folder)
    saved_layout = read_layout(folder)
    saved_layout.check_same(layout, f"checkpoint {folder}", "the training data")
    saved = read_config(folder)
    diffs = [
        f"model.{k}: checkpoint {v!r} vs config {getattr(cfg.model, k)!r}"
        for k, v in to_dict(saved.model).items()
        if k not in RUNTIME_FIELDS and getattr(cfg.model, k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {folder} holds a different model: {'; '.join(diffs)}. "
            "Resume with the checkpoint's model settings, or start a new run."
        )
    return state


def rng_state() -> dict[str, Any]:
    s = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    rank: int,
    world: int,
    save_engine: Callable[[Path], None],
    barrier: Callable[[], None],
    cfg: TrainConfig,
    layout: VocabLayout,
    state: dict[str, Any],
    keep_last: int,
    crash_after_engine: bool = False,
) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    save_engine(tmp)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if crash_after_engine:  # fault injection for tests: die mid-save
        os._exit(13)
    barrier()
    if rank == 0:
        atomic_write_bytes(tmp / "config.yaml", cfg.to_yaml().encode())
        atomic_write_json(tmp / "layout.json", layout.to_dict())
        full = dict(state, step=step, world_size=world, version=FORMAT_VERSION, complete=True)
        atomic_write_json(tmp / "state.json", full)
        fsync_dir(tmp)
        replace_dir(tmp, final)  # the same step saved by an earlier attempt is replaced
        atomic_write_bytes(root / "latest", (final.name + "\n").encode())
        prune(root, keep_last)
    barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    done = list_complete(root)
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def load_rng(folder: Path, rank: int, world: int) -> bool:
    """Restore this rank's RNG if the checkpoint has one for it (same world size)."""
    f = folder / "rng" / f"rank_{rank:05d}.pt"
    if not f.exists() or read_state(folder).get("world_size") != world:
        return False
    set_rng_state(torch.load(f, weights_only=False))
    return True
