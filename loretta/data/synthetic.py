"""Synthetic class-conditioned multimodal samples, written as real shards.

Generated only where asked: a source whose path is `synthetic:FOLDER` (and that has a
`synthetic:` block) is written to FOLDER on first use; a plain path is always real data, and a
missing one is an error even when the source has a `synthetic:` block (a mistyped path must not
train on generated data). `loretta-shards synth` and slurm/prepare_data.sh generate explicitly.

Each sample has a class c. A modality's tokens follow a class-specific pattern (an arithmetic
progression starting at a class-dependent id) with 10% of the tokens replaced by noise, so
a model can learn each modality and the links between modalities of the same sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from loretta.config import SourceConfig, SyntheticConfig
from loretta.data.format import Manifest, read_manifest
from loretta.data.remote import is_url
from loretta.data.shards import Sample, write_dataset
from loretta.errors import DataError
from loretta.vocab import VocabLayout

SYNTHETIC_PREFIX = "synthetic:"


def synthetic_folder(path: str) -> str | None:
    """FOLDER of a `synthetic:FOLDER` source path; None for a plain path or URL."""
    return path[len(SYNTHETIC_PREFIX) :] if path.startswith(SYNTHETIC_PREFIX) else None


def source_path(s: SourceConfig, where: str) -> str:
    """The folder or URL to open for source `s` (`where`: e.g. "data.sources.0"), after writing
    its synthetic dataset when, and only when, its path is `synthetic:FOLDER`."""
    folder = synthetic_folder(s.path)
    if folder is not None:
        if s.synthetic is None or not folder:
            raise DataError(
                f"{where}.path={s.path!r} asks for synthetic data but "
                + ("names no folder" if not folder else "the source has no synthetic: block")
                + "; add a synthetic: block and a folder, or drop the 'synthetic:' prefix"
            )
        ensure_synthetic(folder, s.synthetic)
        return folder
    local = not is_url(s.path)
    if s.synthetic is not None and local and not (Path(s.path) / "manifest.json").exists():
        raise DataError(
            f"{where}.path={s.path!r}: no dataset there (no manifest.json). The source has a "
            "synthetic: block, but synthetic data is generated only where asked: set "
            f"{where}.path=synthetic:{s.path} to generate it there, or correct the path if it "
            "should name real data"
        )
    return s.path


def synthetic_layout(cfg: SyntheticConfig) -> VocabLayout:
    return VocabLayout.build({m: sm.size for m, sm in cfg.modalities.items()})


def class_pattern(c: int, modality_index: int, size: int, length: int, classes: int) -> np.ndarray:
    """Tokens of class c in one modality: a progression from a class-specific start.

    Each modality maps classes to starts through its own fixed permutation, so the patterns of
    two modalities are unrelated: a model can only link them through paired data."""
    perm = np.random.default_rng([12345, modality_index]).permutation(classes)
    start = (int(perm[c]) * size) // classes
    step = 1 + (c + modality_index) % 3
    return (start + step * np.arange(length)) % size


def synthetic_samples(cfg: SyntheticConfig, key_prefix: str = "") -> Iterator[Sample]:
    rng = np.random.default_rng(cfg.seed)
    names = list(cfg.modalities)
    present = set(cfg.present or names)
    for i in range(cfg.samples):
        c = int(rng.integers(cfg.classes))
        sample: Sample = {"key": f"{key_prefix}{i:08d}", "meta": {"label": c}}
        for j, name in enumerate(names):
            sm = cfg.modalities[name]
            n = int(rng.integers(sm.min_len, sm.max_len + 1))
            ids = class_pattern(c, j, sm.size, n, cfg.classes)
            noise = rng.random(n) < cfg.noise
            ids[noise] = rng.integers(0, sm.size, int(noise.sum()))
            if name in present:
                sample[name] = ids.astype(np.int64)
        yield sample


def ensure_synthetic(path: str | Path, cfg: SyntheticConfig) -> Manifest:
    """Write the synthetic dataset at `path` unless one built from the same config is there.

    Several processes may call this at once: each writes its own temporary folder and the
    rename makes one of them win; the others find the finished dataset.
    """
    path = Path(path)
    spec = {"synthetic": _spec(cfg)}
    if (path / "manifest.json").exists():
        manifest = read_manifest(path / "manifest.json")
        if manifest.meta.get("synthetic") != spec["synthetic"]:
            raise DataError(
                f"{path} holds a dataset built from a different synthetic config "
                f"({manifest.meta.get('synthetic')}); delete it or point the source elsewhere"
            )
        return manifest
    try:
        return write_dataset(
            synthetic_samples(cfg), path, synthetic_layout(cfg), cfg.samples_per_shard, meta=spec
        )
    except (DataError, OSError):
        if (path / "manifest.json").exists():  # another process finished first
            return read_manifest(path / "manifest.json")
        raise


def _spec(cfg: SyntheticConfig) -> dict[str, object]:
    from loretta.configlib import to_dict

    return dict(to_dict(cfg))
