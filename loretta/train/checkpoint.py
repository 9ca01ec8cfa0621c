"""Self-describing checkpoint folders, written atomically.

    <run_dir>/checkpoints/
      latest                  name of the newest complete checkpoint (written last, atomically)
      step_00000100/
        ds/                   DeepSpeed ZeRO state (every rank's partition)
        latest                "ds": DeepSpeed's own tag file, so its tools (zero_to_fp32.py) find
                              ds/ when given the step folder without --tag
        universal/            DeepSpeed universal checkpoint (made on demand, for a new world size)
        rng/rank_00000.safetensors   every rank's RNG states (tensors + JSON metadata, no pickle)
        config.yaml           the resolved TrainConfig
        layout.json           the vocabulary layout
        state.json            step, tokens, world size, data-loader state, wandb id; "complete": true
        manifest.json         size and CRC-32 of every file above (integrity.py), written last

All ranks write into ``.step_N.tmp/``; rank 0 writes the manifest and renames the folder to
``step_N/`` after a barrier, then updates ``latest`` and prunes old folders. A crash at any point
leaves the previous checkpoint untouched. Before any process group starts, the checkpoint to
resume from is verified against its manifest: ``resume: auto`` reports a damaged newest folder
and takes the newest intact one; a damaged folder named explicitly is an error naming the file.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
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
from loretta.train import integrity
from loretta.vocab import VocabLayout

STEP_RE = re.compile(r"^step_(\d{8})$")
DS_TAG = "ds"  # the tag engine.py saves DeepSpeed's state under, inside the step folder
FORMAT_VERSION = 2  # 2: manifest.json, RNG in safetensors


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
    """The newest complete checkpoint folder (by state.json alone, nothing verified)."""
    done = list_complete(root)
    return done[-1] if done else None


def candidates(root: Path) -> list[Path]:
    """Every step_N folder, newest first (a finished save is always renamed to step_N)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_RE.match(p.name)), reverse=True)


def check_folder(folder: Path, full: bool = True) -> list[str]:
    """Problems that make `folder` unusable for a resume ([] = intact). Checkpoints from before
    manifests (format 1) get the structural checks only."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        state = None
    except (OSError, json.JSONDecodeError) as e:
        return [f"state.json: unreadable ({e})"]
    legacy = (
        isinstance(state, dict)
        and int(state.get("version", 1)) < 2
        and not (folder / integrity.MANIFEST).exists()
    )
    if not legacy:
        problems = integrity.verify(folder, full=full)
        if problems:
            return problems
    # DeepSpeed unpickles ds/*.pt: no code may hide in them. Old rng/*.pt files are ours, read
    # with weights_only=True (now, so that one we cannot read fails before any process group)
    problems = integrity.check_pickles(folder, skip=("rng/",))
    for f in sorted((folder / "rng").glob("*.pt")):
        try:
            read_rng(f)
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        return problems
    if state is None:
        return ["state.json: missing"]
    if not isinstance(state, dict) or not state.get("complete"):
        return ["state.json: does not say complete=true (the save was interrupted)"]
    problems = []
    world = state.get("world_size")
    for r in range(int(world) if isinstance(world, int) else 0):
        if not any((folder / "rng" / f"rank_{r:05d}{ext}").exists() for ext in RNG_EXTS):
            problems.append(f"rng/rank_{r:05d}.safetensors: missing")
    if not (folder / "ds").is_dir():
        problems.append("ds/: missing (no DeepSpeed state)")
    for name in ("config.yaml", "layout.json"):
        if not (folder / name).is_file():
            problems.append(f"{name}: missing")
    return problems


def _report(folder: Path, problems: list[str], verdict: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        lines = "\n".join(f"    {folder / p}" for p in problems)
        print(
            f"[loretta] checkpoint {folder} is damaged:\n{lines}\n  {verdict}",
            file=sys.stderr,
            flush=True,
        )


def newest_intact(root: Path, full: bool = True, what: str = "auto") -> Path | None:
    """The newest checkpoint that passes `check_folder`; damaged newer ones are reported."""
    skipped: list[Path] = []
    for folder in candidates(root):
        problems = check_folder(folder, full)
        if not problems:
            if skipped:
                _report_fallback(skipped, folder)
            return folder
        _report(folder, problems, "skipping it")
        skipped.append(folder)
    if skipped:
        raise CheckpointError(
            f"checkpoint.resume={what!r}: every checkpoint in {root} is damaged "
            f"({', '.join(p.name for p in skipped)}; see the report above). Restore one from a "
            "copy, or start fresh with --resume none in a new run folder"
        )
    return None


def _report_fallback(skipped: list[Path], chosen: Path) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"[loretta] resuming from {chosen.name}, the newest intact checkpoint "
            f"(skipped damaged: {', '.join(p.name for p in skipped)})",
            file=sys.stderr,
            flush=True,
        )


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh start. The folder is verified
    against its manifest (nothing is loaded from a folder that fails)."""
    mode = cfg.checkpoint.resume
    full = cfg.checkpoint.verify == "full"
    if mode == "none":
        return None
    if mode == "auto":
        return newest_intact(checkpoints_dir(cfg), full)
    path = Path(mode)
    if path.is_dir() and not STEP_RE.match(path.name) and candidates(path):
        found = newest_intact(path, full, mode)  # a checkpoints/ folder: take its newest
        if found is None:
            raise CheckpointError(f"checkpoint.resume={mode!r}: no complete checkpoint inside")
        return found
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint.resume={mode!r}: no such folder; use auto, none, or a step_N folder"
        )
    problems = check_folder(path, full)
    if problems:
        raise CheckpointError(
            f"checkpoint.resume={mode!r} is damaged: {'; '.join(problems)}. Resume from an "
            "earlier checkpoint (or --resume auto, which takes the newest intact one)"
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


RNG_EXTS = (".safetensors", ".pt")


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


def save_rng(path: Path) -> None:
    """This process's RNG states as safetensors: tensors for the generator words, the few
    scalars as JSON metadata. Read back without unpickling anything."""
    from safetensors.torch import save_file

    s = rng_state()
    version, words, gauss = s["python"]
    name, keys, pos, has_gauss, cached = s["numpy"]
    tensors = {
        "torch": s["torch"],
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
    }
    for i, t in enumerate(s.get("cuda", [])):
        tensors[f"cuda.{i}"] = t
    meta = {
        "python": json.dumps({"version": version, "gauss_next": gauss}),
        "numpy": json.dumps(
            {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
        ),
    }
    save_file(tensors, str(path), metadata=meta)


def read_rng(path: Path) -> dict[str, Any]:
    """RNG states from a safetensors file (or an old .pt file, read with weights_only=True)."""
    if path.suffix == ".pt":
        try:
            return dict(torch.load(path, weights_only=True))
        except Exception as e:
            raise CheckpointError(
                f"{path}: an RNG file in the old pickle format that cannot be read without "
                f"running code from it ({type(e).__name__}); loretta no longer unpickles "
                "checkpoint files. Resume from a checkpoint written by this version, or "
                "delete this checkpoint's rng/ folder and its manifest entry knowingly "
                "(dropout masks will then differ from an uninterrupted run)"
            ) from e
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        py, npm = json.loads(meta["python"]), json.loads(meta["numpy"])
        gauss = py["gauss_next"]
        s: dict[str, Any] = {
            "torch": t["torch"],
            "python": (int(py["version"]), tuple(int(v) for v in t["python"].tolist()), gauss),
            "numpy": (
                str(npm["name"]),
                t["numpy"].numpy().astype(np.uint32),
                int(npm["pos"]),
                int(npm["has_gauss"]),
                float(npm["cached"]),
            ),
        }
        cuda = sorted((k for k in t if k.startswith("cuda.")), key=lambda k: int(k[5:]))
        if cuda:
            s["cuda"] = [t[k] for k in cuda]
        return s
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable RNG state ({type(e).__name__}: {e})") from e


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
    save_rng(tmp / "rng" / f"rank_{rank:05d}.safetensors")
    if crash_after_engine:  # fault injection for tests: die mid-save
        os._exit(13)
    barrier()
    if rank == 0:
        atomic_write_bytes(tmp / "config.yaml", cfg.to_yaml().encode())
        atomic_write_json(tmp / "layout.json", layout.to_dict())
        full = dict(state, step=step, world_size=world, version=FORMAT_VERSION, complete=True)
        atomic_write_json(tmp / "state.json", full)
        # DeepSpeed's tools read <dir>/latest for the tag when given a folder without --tag; the
        # manifest lists it like every file. (checkpoints/latest stays our step folder name:
        # scripts such as slurm/pretrain.sh read it as one.)
        atomic_write_bytes(tmp / "latest", DS_TAG.encode())
        integrity.write_manifest(tmp)  # last: it lists every rank's files, now all written
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
    """Restore this rank's RNG (same world size only: at another world size the ranks' streams
    are not the same streams). A missing file for a same-size resume is an error."""
    if read_state(folder).get("world_size") != world:
        return False
    for ext in RNG_EXTS:
        f = folder / "rng" / f"rank_{rank:05d}{ext}"
        if f.exists():
            set_rng_state(read_rng(f))
            return True
    raise CheckpointError(
        f"{folder}/rng/rank_{rank:05d}.safetensors: missing; the checkpoint is incomplete. "
        "Resume from an earlier checkpoint"
    )
