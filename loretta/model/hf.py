"""Mapping between our decoder's weights and Hugging Face Llama/Mistral checkpoints.

Ours fuses q|k|v into `attention.wqkv` and gate|up into `feed_forward.w13`; HF keeps them
separate. Rotary embeddings use HF's rotate_half layout in both, so no q/k permutation is needed.
Operates on one tensor at a time so that converters can stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from loretta.model.config import DecoderConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# ours (inside a layer) -> HF (inside a layer), for tensors that map one to one
_SIMPLE = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_SIMPLE_INV = {v: k for k, v in _SIMPLE.items()}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_TOP_INV = {v: k for k, v in _TOP.items()}


def split_sizes(cfg: DecoderConfig) -> tuple[list[int], list[int]]:
    hd = cfg.head_dim
    return [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd], [cfg.hidden_dim] * 2


def to_hf(name: str, t: torch.Tensor, cfg: DecoderConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """One of our tensors -> one or more HF (name, tensor) pairs."""
    if name in _TOP:
        yield _TOP[name], t
        return
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"unexpected parameter {name!r}")
    i, rest = m.group(1), m.group(2)
    pre = f"model.layers.{i}."
    qkv, w13 = split_sizes(cfg)
    if rest == "attention.wqkv.weight":
        q, k, v = t.split(qkv, dim=0)
        yield pre + "self_attn.q_proj.weight", q
        yield pre + "self_attn.k_proj.weight", k
        yield pre + "self_attn.v_proj.weight", v
    elif rest == "feed_forward.w13.weight":
        gate, up = t.split(w13, dim=0)
        yield pre + "mlp.gate_proj.weight", gate
        yield pre + "mlp.up_proj.weight", up
    elif rest in _SIMPLE:
        yield pre + _SIMPLE[rest], t
    else:
        raise KeyError(f"unexpected parameter {name!r}")


def hf_groups(cfg: DecoderConfig) -> Iterator[tuple[str, list[str]]]:
    """(our name, the HF names it is made of, in concatenation order)."""
    for ours, hf in _TOP.items():
        if ours == "output.weight" and cfg.tie_embeddings:
            continue
        yield ours, [hf]
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        yield (
            f"layers.{i}.attention.wqkv.weight",
            [
                pre + "self_attn.q_proj.weight",
                pre + "self_attn.k_proj.weight",
                pre + "self_attn.v_proj.weight",
            ],
        )
        yield (
            f"layers.{i}.feed_forward.w13.weight",
            [
                pre + "mlp.gate_proj.weight",
                pre + "mlp.up_proj.weight",
            ],
        )
        for ours_rest, hf_rest in _SIMPLE.items():
            yield f"layers.{i}.{ours_rest}", [pre + hf_rest]


def from_hf(get: Any, cfg: DecoderConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors (fetched by name with `get(name)`) -> our (name, tensor) pairs, streaming."""
    for ours, parts in hf_groups(cfg):
        tensors = [get(p) for p in parts]
        yield ours, tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def hf_config(cfg: DecoderConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json for LlamaForCausalLM, or MistralForCausalLM when a sliding window is set."""
    mistral = cfg.sliding_window is not None
    c: dict[str, Any] = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": 1 << 16,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if mistral:
        c["sliding_window"] = cfg.sliding_window
    return c


def decoder_config_from_hf(c: dict[str, Any]) -> DecoderConfig:
    n_heads = int(c["num_attention_heads"])
    dim = int(c["hidden_size"])
    if int(c.get("head_dim") or dim // n_heads) * n_heads != dim:
        raise ValueError(
            "HF config with head_dim * num_attention_heads != hidden_size is unsupported"
        )
    return DecoderConfig(
        vocab_size=int(c["vocab_size"]),
        dim=dim,
        n_layers=int(c["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        ffn_dim=int(c["intermediate_size"]),
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        rope_theta=float(c.get("rope_theta", 10000.0)),
        sliding_window=c.get("sliding_window"),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        init_std=float(c.get("initializer_range", 0.02)),
    )
