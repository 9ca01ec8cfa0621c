"""Our parameter names and shapes, their Hugging Face Llama/Mistral counterparts, and the model
configs on both sides (config.json; the `model` section of a TrainConfig YAML).

The per-tensor mapping itself (wqkv rows [q | k | v], w13 rows [gate | up]) lives with the model
in loretta/model/hf.py; this module plans whole checkpoints with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loretta.configlib import from_dict
from loretta.errors import CheckpointError
from loretta.model import hf as hf_map
from loretta.model.config import DecoderConfig
from loretta.vocab import VocabLayout

# DecoderConfig values that fix the tensors' shapes and meaning (derived ones included)
ARCH_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "hidden_dim")
ARCH_FIELDS_ALL = (*ARCH_FIELDS, "tie_embeddings", "norm_eps", "rope_theta", "sliding_window")


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
    """Our tensor -> its Hugging Face pieces: wqkv and w13 become row blocks (contiguous
    views); other tensors are renamed."""
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
    """config.json with the special ids of this layout and the trained context length."""
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


def arch_diffs(a: DecoderConfig, b: DecoderConfig, names: tuple[str, ...]) -> list[str]:
    return [
        f"model.{k}: {getattr(a, k)!r} vs {getattr(b, k)!r}"
        for k in names
        if getattr(a, k) != getattr(b, k)
    ]
