"""Open any checkpoint folder, and load weights: for a warm start (check_init_source,
load_for_init; training imports only this) and for inference (load_model)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from loretta.checkpoint.hf import ARCH_FIELDS, arch_diffs
from loretta.checkpoint.source import ConsolidatedSource, HFSource, Source
from loretta.checkpoint.zero import ZeroSource, resolve_zero
from loretta.errors import CheckpointError, DataError
from loretta.model import Decoder
from loretta.model.config import DecoderConfig
from loretta.vocab import VocabLayout


def open_source(
    path: str | Path, step: int | None = None, layout: str | Path | None = None
) -> Source:
    """Open a ZeRO-3 checkpoint (step folder, checkpoints/ folder or run dir), a consolidated
    folder or a Hugging Face folder for reading. `layout` is a layout.json for an HF folder
    that has no loretta_layout.json (one loretta did not write)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    zero = resolve_zero(path, step)
    if zero is not None:
        return ZeroSource(zero)
    if step is not None:
        raise CheckpointError(f"--step {step}: {path} is not a run or checkpoints folder")
    if (path / "config.json").exists():
        return HFSource(path, Path(layout) if layout else None)
    if (path / "config.yaml").exists():
        return ConsolidatedSource(path)
    raise CheckpointError(
        f"{path}: not a checkpoint folder (state.json + ds/), a run dir, a consolidated export "
        "(config.yaml + layout.json + model*.safetensors) or a Hugging Face folder (config.json)"
    )


def check_init_source(
    path: str | Path,
    model_cfg: DecoderConfig,
    layout: VocabLayout,
    layout_file: str | Path | None = None,
) -> Source:
    """Open a warm-start source and check its layout and architecture against this run's (reads
    headers only). `layout_file` (checkpoint.init_layout) gives the vocabulary layout of a
    Hugging Face folder loretta did not write. Raises CheckpointError naming the file and the
    differences."""
    where = f"checkpoint.init_from={str(path)!r}"
    src = open_source(path, layout=layout_file or None)
    try:
        if src.layout is None:
            raise CheckpointError(
                f"{where}: {src.layout_file} missing: this Hugging Face folder was not written "
                "by loretta, so nothing says which token ids mean what. Pass the vocabulary "
                "layout it was trained with: --checkpoint.init_layout=LAYOUT.json for training "
                "(--layout LAYOUT.json for loretta-convert); a run's layout.json or a dataset "
                "manifest's layout will do"
            )
        try:
            src.layout.check_same(layout, str(src.layout_file), "this run's training data")
        except DataError as e:
            raise CheckpointError(f"{where}: {e}") from e
        diffs = arch_diffs(src.model_cfg, model_cfg, (*ARCH_FIELDS, "tie_embeddings"))
        if diffs:
            raise CheckpointError(
                f"{where}: {src.config_file} (left) holds a different "
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
    path: str | Path,
    model_cfg: DecoderConfig,
    layout: VocabLayout,
    layout_file: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Initial weights for a new run at any world size, from a consolidated folder, an HF folder
    or a ZeRO-3 checkpoint: CPU tensors in our parameter names, in the stored dtype."""
    with check_init_source(path, model_cfg, layout, layout_file) as src:
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
