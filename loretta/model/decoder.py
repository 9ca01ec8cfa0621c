"""A Llama/Mistral-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention,
optional sliding window, packed rows (per-document positions, no cross-document attention) and
a KV cache for incremental decoding. Pure torch: nothing here knows about ranks or DeepSpeed.

Shapes: B batch, T tokens, d model width, H query heads, Hkv key/value heads, hd head dim.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loretta.model.attention import AttnMeta, attention, build_meta, resolve_backend
from loretta.model.config import DecoderConfig
from loretta.train.loss import linear_cross_entropy, resolve_loss_impl


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 whatever the compute dtype (as Llama and HF do)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return self.weight * y


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each (B, T, 1, hd), for (B, T) positions (half-split layout).

    The sin carries rotate_half's sign ([-sin | +sin]) so that rotating is x*cos + roll(x)*sin.
    """
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
        )
    )
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    cos = torch.cat([cos, cos], dim=-1)[:, :, None, :]  # (B, T, 1, hd)
    sin = torch.cat([-sin, sin], dim=-1)[:, :, None, :]
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, h, hd). HF's rotate_half(x) = [-x2, x1] = roll(x, hd/2) * [-1 | +1]; the sign
    # lives in `sin`, so one roll replaces a negation and a concatenation.
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


@dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding.

    k, v: (L, B, Tmax, Hkv, hd); doc_ids: (B, Tmax) document id of each cached slot.
    Dynamic (default): a step attends to the filled slots [0, length) (a new shape every step).
    Static (`pos` set, a (1,) device tensor of the next free slot): a step writes its slots by
    index and attends to all Tmax slots, the unfilled ones masked as "future" keys, so every
    decode step has the same shapes and no Python int changes: it can be compiled or captured
    in a CUDA graph.
    """

    k: torch.Tensor
    v: torch.Tensor
    doc_ids: torch.Tensor
    length: int = 0
    pos: torch.Tensor | None = None

    @classmethod
    def empty(
        cls,
        cfg: DecoderConfig,
        batch: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        static: bool = False,
    ) -> KVCache:
        shape = (cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
        return cls(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            doc_ids=torch.zeros(batch, max_len, device=device, dtype=torch.long),
            pos=torch.zeros(1, device=device, dtype=torch.long) if static else None,
        )


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # q, k and v in one matmul: rows [q (H*hd) | k (Hkv*hd) | v (Hkv*hd)]
        self.wqkv = nn.Linear(cfg.dim, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta,
        backend: str,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv, self.hd)
        # rotate the q and k heads in one go: (B, T, H + Hkv, hd)
        qk = apply_rope(qkv[:, :, : self.n_heads + self.n_kv], cos, sin)
        q, k = qk.split([self.n_heads, self.n_kv], dim=2)  # (B, T, H, hd), (B, T, Hkv, hd)
        v = qkv[:, :, self.n_heads + self.n_kv :]
        if cache is not None and meta.q_slots is not None:  # static cache: write by index
            cache.k[layer].index_copy_(1, meta.q_slots, k)
            cache.v[layer].index_copy_(1, meta.q_slots, v)
            k, v = cache.k[layer], cache.v[layer]  # (B, Tmax, Hkv, hd), future slots masked
        elif cache is not None:
            s = cache.length
            cache.k[layer, :, s : s + T] = k
            cache.v[layer, :, s : s + T] = v
            k, v = cache.k[layer, :, : s + T], cache.v[layer, :, : s + T]
        out = attention(q, k, v, meta, backend)  # (B, T, H, hd)
        return self.wo(out.reshape(B, T, self.n_heads * self.hd))


class FeedForward(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.hidden = cfg.hidden_dim
        self.w13 = nn.Linear(cfg.dim, 2 * self.hidden, bias=False)  # [gate | up]
        self.w2 = nn.Linear(self.hidden, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.compiled: Callable[..., torch.Tensor] | None = None  # see Decoder.compile_blocks

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta,
        backend: str,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        # the compiled body serves full-sequence forwards; KV-cache decode steps (a new shape
        # every step) stay eager. Module hooks (ZeRO-3's gathers) run outside, in __call__.
        if self.compiled is not None and cache is None:
            return self.compiled(x, cos, sin, meta, backend)
        return self.body(x, cos, sin, meta, backend, cache, layer)

    def body(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttnMeta,
        backend: str,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        h = x + self.dropout(
            self.attention(self.attention_norm(x), cos, sin, meta, backend, cache, layer)
        )
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))


def compile_enabled(mode: str | bool, device_type: str) -> bool:
    """model.compile resolved for a device: 'auto' compiles on CUDA only (on the CPU, compiling
    costs more than it saves at the sizes that run there)."""
    return device_type == "cuda" if mode == "auto" else bool(mode)


class OutputHead(nn.Linear):
    """The output projection; given targets it returns per-token losses instead of logits,
    fused with the cross-entropy so that the (B*T, V) logits never exist at once."""

    def forward(  # type: ignore[override]
        self,
        h: torch.Tensor,
        targets: torch.Tensor | None = None,
        impl: str = "chunked",
        chunk: int = 0,
    ) -> torch.Tensor:
        if targets is None:
            return super().forward(h)  # (B, T, V)
        return linear_cross_entropy(h, self.weight, targets, impl, chunk)  # (B*T,) fp32


@dataclass
class _Ctx:
    """What every layer of one forward shares."""

    cos: torch.Tensor
    sin: torch.Tensor
    meta: AttnMeta
    cache: KVCache | None
    n_new: int


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        problems = cfg.problems()
        if cfg.vocab_size < 1:
            problems.append("model.vocab_size must be set (>= 1) before building the model")
        if problems:
            raise ValueError("invalid DecoderConfig: " + "; ".join(problems))
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = (
            None if cfg.tie_embeddings else OutputHead(cfg.dim, cfg.vocab_size, bias=False)
        )
        self.backend: str = "sdpa" if cfg.attn_backend == "auto" else cfg.attn_backend
        self.loss_impl: str = "chunked" if cfg.loss_impl == "auto" else cfg.loss_impl
        self.activation_checkpointing = False
        self.init_weights()

    # ---- initialisation -----------------------------------------------------------------------
    def init_std(self, name: str) -> float | None:
        """Init std of parameter `name`; None for norm weights (ones). Residual outputs are
        scaled by 1/sqrt(2 * n_layers) (GPT-2 / OLMo's scaled init)."""
        if name.endswith("norm.weight"):
            return None
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        return self.cfg.init_std

    @torch.no_grad()
    def init_param(self, name: str, p: torch.Tensor, seed: int = 0) -> None:
        """Initialise one parameter from a generator keyed by (seed, name): the result does not
        depend on construction order, device count or sharding."""
        std = self.init_std(name)
        if p.is_meta:  # built on the meta device, to be loaded with assign=True
            return
        if std is None:
            p.fill_(1.0)
            return
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)

    def init_weights(self, seed: int = 0) -> None:
        for name, p in self.named_parameters():
            self.init_param(name, p, seed)

    # ---- forward ------------------------------------------------------------------------------
    def set_backend(self, name: str, device: torch.device) -> str:
        self.backend = resolve_backend(name, device, self.cfg.sliding_window)
        return self.backend

    def set_loss_impl(self, name: str, device: torch.device) -> str:
        self.loss_impl = resolve_loss_impl(name, device)
        return self.loss_impl

    def compile_blocks(self, mode: str | bool = "auto", device: torch.device | None = None) -> bool:
        """torch.compile each block's body (not the whole model: a ZeRO-3 engine gathers and
        releases weights in hooks at module boundaries, which stay outside the graphs).
        mode 'auto': on for CUDA, off elsewhere. Returns whether blocks are compiled."""
        dev = device or self.tok_embeddings.weight.device
        on = compile_enabled(mode, dev.type)
        for layer in self.layers:
            assert isinstance(layer, Block)
            # dynamic=None: shapes are fixed in training; an int that changes between batches
            # (max_seqlen of packed documents) becomes symbolic after one recompile
            layer.compiled = torch.compile(layer.body) if on else None
        return on

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or final hidden states (B, T, d), or with
        `targets` (B, T) per-token losses (B*T,) in fp32 (0 where the target is IGNORE), fused
        with the output projection while its weight is at hand (gathered, under ZeRO-3).

        Packed rows: `doc_ids` (B, T) marks documents (contiguous runs); tokens attend only within
        their document, and `position_ids` should restart at 0 per document. With a `cache`,
        queries sit after cache.length cached slots and `doc_ids` covers the new tokens only.
        """
        h, ctx = self.begin(input_ids, position_ids, doc_ids, cache)
        for i in range(len(self.layers)):
            h = self.run_layer(i, h, ctx)
        if targets is not None:
            return self.loss(self.end(h, ctx, return_hidden=True), targets)
        return self.end(h, ctx, return_hidden)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states (B, T, d), targets (B, T) -> per-token losses (B*T,)."""
        chunk = self.cfg.loss_chunk
        if self.output is None:
            return linear_cross_entropy(
                h, self.tok_embeddings.weight, targets, self.loss_impl, chunk
            )
        out: torch.Tensor = self.output(h, targets, self.loss_impl, chunk)
        return out

    # forward in three pieces, so that a caller can wrap each piece (e.g. gather its weights)
    def begin(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, _Ctx]:
        B, T = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        h = self.tok_embeddings(input_ids)  # (B, T, d)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        if cache is None:
            meta = build_meta(doc_ids, (B, T), h.device, self.cfg.sliding_window, self.backend)
            if self.backend in ("eager", "sdpa"):
                meta.dense_mask(T, T, h.device)  # built once here, not inside a compiled block
        elif cache.pos is not None:  # static: slots from a device tensor, keys = all slots
            if doc_ids is None:
                doc_ids = torch.zeros(B, T, dtype=torch.long, device=h.device)
            slots = cache.pos + torch.arange(T, device=h.device)
            cache.doc_ids.index_copy_(1, slots, doc_ids)
            meta = AttnMeta(
                doc_ids=doc_ids,
                k_doc_ids=cache.doc_ids,
                q_slots=slots,
                window=self.cfg.sliding_window,
            )
        else:
            s = cache.length
            if doc_ids is None:
                doc_ids = torch.zeros(B, T, dtype=torch.long, device=h.device)
            cache.doc_ids[:, s : s + T] = doc_ids
            meta = AttnMeta(
                doc_ids=doc_ids,
                k_doc_ids=cache.doc_ids[:, : s + T],
                q_offset=s,
                window=self.cfg.sliding_window,
            )
        return h, _Ctx(cos, sin, meta, cache, T)

    def run_layer(self, i: int, h: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        layer = self.layers[i]
        if self.activation_checkpointing and self.training and ctx.cache is None:
            return checkpoint(
                layer, h, ctx.cos, ctx.sin, ctx.meta, self.backend, use_reentrant=False
            )
        return layer(h, ctx.cos, ctx.sin, ctx.meta, self.backend, ctx.cache, i)

    def end(self, h: torch.Tensor, ctx: _Ctx, return_hidden: bool = False) -> torch.Tensor:
        if ctx.cache is not None and ctx.cache.pos is not None:
            ctx.cache.pos += ctx.n_new  # in place, on the device (length is not kept)
        elif ctx.cache is not None:
            ctx.cache.length += ctx.n_new
        h = self.norm(h)
        return h if return_hidden else self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)
