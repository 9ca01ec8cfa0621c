"""Attention backends behind one signature, with document (packed-row) masking.

Every backend computes causal attention restricted to the query's own document and, when a
sliding window W is set, to the last W keys (the query included). Shapes:
    q: (B, Tq, H, hd)   k, v: (B, Tk, Hkv, hd)   ->   out: (B, Tq, H, hd)

``eager`` is the reference math. ``sdpa`` calls torch's scaled_dot_product_attention (which picks
FlashAttention/memory-efficient kernels on CUDA). ``varlen`` (torch.nn.attention.varlen),
``flash_attn`` (the flash-attn 2 package) and ``flash_attn_4`` (the flash-attn-4 package,
``flash_attn.cute``: FlashAttention for Hopper and Blackwell, compute capability >= 9) run on
flattened documents given by cu_seqlens, so no (T, T) mask is ever built; all three are
CUDA-only. ``auto`` takes the first available of flash_attn_4, flash_attn, varlen, sdpa.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loretta.optional import find_spec, import_problem

BACKENDS = ("eager", "sdpa", "varlen", "flash_attn", "flash_attn_4")
_VARLEN_BACKENDS = ("varlen", "flash_attn", "flash_attn_4")


class AttentionBackendError(RuntimeError):
    pass


def _varlen_fn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_attn_2_problem() -> str | None:
    # flash-attn-4 alone installs flash_attn/ as a namespace package (no __init__, origin None)
    spec = find_spec("flash_attn")
    if spec is None or spec.origin in (None, "namespace"):
        return "the flash-attn package is not installed (pip install 'loretta[gpu]')"
    return import_problem("flash_attn", "pip install 'loretta[gpu]'")


@functools.cache
def _varlen_params() -> frozenset[str]:
    """Keyword arguments of this torch's varlen_attn. Its API moved between releases: 2.10 takes
    `is_causal`, 2.11 `window_size`, later releases also `enable_gqa`."""
    fn = _varlen_fn()
    return frozenset(inspect.signature(fn).parameters) if fn is not None else frozenset()


def backend_available(
    name: str, device: torch.device, window: int | None = None
) -> tuple[bool, str]:
    """(available, reason if not) for backend `name` on `device` (with a sliding `window`)."""
    if name in ("eager", "sdpa"):
        return True, ""
    if device.type != "cuda":
        return False, f"'{name}' runs on CUDA only (device is {device.type})"
    if name == "varlen":
        if _varlen_fn() is None:
            return False, f"torch {torch.__version__} has no torch.nn.attention.varlen"
        if window is not None and "window_size" not in _varlen_params():
            return False, (
                f"torch {torch.__version__}'s varlen_attn has no sliding window "
                "(model.sliding_window is set; torch >= 2.11 has one)"
            )
        return True, ""
    if name == "flash_attn":
        problem = _flash_attn_2_problem()
        return (False, problem) if problem else (True, "")
    if name == "flash_attn_4":
        problem = import_problem("flash_attn.cute", "pip install --pre flash-attn-4")
        if problem:
            return False, f"flash-attn-4: {problem}"
        major = torch.cuda.get_device_capability(device)[0]
        if major < 9:
            return (
                False,
                f"flash-attn-4 needs compute capability >= 9 (Hopper), this GPU has {major}",
            )
        return True, ""
    return False, f"unknown backend {name!r}; choose one of {('auto', *BACKENDS)}"


def resolve_backend(name: str, device: torch.device, window: int | None = None) -> str:
    """'auto' -> the fastest available backend; an unavailable explicit choice is an error."""
    if name == "auto":
        for cand in ("flash_attn_4", "flash_attn", "varlen", "sdpa"):
            if backend_available(cand, device, window)[0]:
                return cand
        return "sdpa"
    ok, why = backend_available(name, device, window)
    if not ok:
        raise AttentionBackendError(
            f"model.attn_backend={name!r} is not available: {why}. "
            "Use 'auto' to pick the fastest available, or 'sdpa'."
        )
    return name


@dataclass
class AttnMeta:
    """Per-forward masking information, computed once and shared by all layers.

    doc_ids: (B, Tq) document id per query token, or None (one document per row, plain causal).
    k_doc_ids: (B, Tk) document ids of the keys when they differ from the queries' (KV cache).
    q_offset: cache slot of the first query; query i sits in slot q_offset + i, key j in slot j.
    window: sliding window W (keys visible to a query, itself included), or None.
    cu_seqlens, max_seqlen: document boundaries of the flattened batch for the varlen kernels.
    _mask: the dense mask, built on first use and shared by the layers.
    """

    doc_ids: torch.Tensor | None = None
    k_doc_ids: torch.Tensor | None = None
    q_offset: int = 0  # slot of the first query (tokens already in the KV cache)
    q_slots: torch.Tensor | None = None  # (Tq,) cache slots of the queries (static KV cache)
    window: int | None = None
    cu_seqlens: torch.Tensor | None = None  # (N+1,) int32, for varlen kernels
    max_seqlen: int = 0
    _mask: torch.Tensor | None = None

    def dense_mask(self, tq: int, tk: int, device: torch.device) -> torch.Tensor | None:
        """(B or 1, 1, Tq, Tk) boolean mask, True = may attend; None = plain causal from slot 0."""
        if self._mask is not None:
            return self._mask
        if (
            self.doc_ids is None
            and self.q_offset == 0
            and self.q_slots is None
            and self.window is None
            and tq == tk
        ):
            return None
        if self.q_slots is not None:
            q_slot = self.q_slots
        else:
            q_slot = torch.arange(self.q_offset, self.q_offset + tq, device=device)
        k_slot = torch.arange(tk, device=device)
        rel = q_slot[:, None] - k_slot[None, :]  # (Tq, Tk) distance back in slots
        mask = rel >= 0
        if self.window is not None:
            mask = mask & (rel < self.window)
        mask = mask[None, None]
        if self.doc_ids is not None:
            kd = self.k_doc_ids if self.k_doc_ids is not None else self.doc_ids
            mask = mask & (self.doc_ids[:, None, :, None] == kd[:, None, None, :])
        self._mask = mask
        return mask


def build_meta(
    doc_ids: torch.Tensor | None,
    shape: tuple[int, int],
    device: torch.device,
    window: int | None,
    backend: str,
    q_offset: int = 0,
) -> AttnMeta:
    """Masking info for a (B, T) batch; cu_seqlens for varlen kernels (training forward only)."""
    meta = AttnMeta(doc_ids=doc_ids, window=window, q_offset=q_offset)
    if backend in _VARLEN_BACKENDS and q_offset == 0:
        B, T = shape
        if doc_ids is None:  # one document per row
            cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
            meta.cu_seqlens, meta.max_seqlen = cu, T
            return meta
        flat = doc_ids.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::T] = True  # every row starts a document
        idx = starts.nonzero().flatten().to(torch.int32)
        end = torch.tensor([B * T], dtype=torch.int32, device=device)
        meta.cu_seqlens = torch.cat([idx, end])
        meta.max_seqlen = int((meta.cu_seqlens[1:] - meta.cu_seqlens[:-1]).max().item())
    return meta


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, backend: str
) -> torch.Tensor:
    if backend == "eager":
        return _eager(q, k, v, meta)
    if backend == "sdpa":
        return _sdpa(q, k, v, meta)
    if backend == "varlen":
        return _varlen(q, k, v, meta)
    if backend == "flash_attn":
        return _flash(q, k, v, meta)
    if backend == "flash_attn_4":
        return _flash4(q, k, v, meta)
    raise AttentionBackendError(f"unknown attention backend {backend!r}")


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, Hkv, T, hd) -> (B, Hkv * n_rep, T, hd)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    _B, Tq, H, hd = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
    kh, vh = _repeat_kv(kh, H // Hkv), _repeat_kv(vh, H // Hkv)
    scores = (qh @ kh.transpose(-2, -1)).float() / math.sqrt(hd)  # (B, H, Tq, Tk)
    mask = meta.dense_mask(Tq, Tk, q.device)
    if mask is None:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return (probs @ vh).transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    Tq, H, Tk, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = meta.dense_mask(Tq, Tk, q.device)
    if mask is None:
        # plain causal rows: the kernels' built-in causal path (no mask tensor)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=H != Hkv)
    elif H != Hkv and q.device.type == "cpu" and not q.requires_grad:
        # no-grad on the CPU (decoding): grouped heads without copying the keys and values per
        # query head; the same bits as the copy (tests/test_model.py), 2.5x faster at a decode
        # step's shapes. With gradients the two sum the key/value gradients in another order.
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    else:
        kh, vh = _repeat_kv(kh, H // Hkv), _repeat_kv(vh, H // Hkv)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(1, 2)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[2], x.shape[3])  # (B*T, h, hd)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    if not _kernel_applies(q, meta):
        return _sdpa(q, k, v, meta)
    params = _varlen_params()
    kw: dict[str, Any] = {}
    H, Hkv = q.shape[2], k.shape[2]
    if H != Hkv:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # older kernels want as many K/V heads as query heads
            k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    if "window_size" in params:
        kw["window_size"] = _causal_window(meta)
    else:  # torch 2.10: a causal flag and no window (a window is refused at resolve time)
        kw["is_causal"] = True
    return _over_documents(q, k, v, meta, _varlen_fn(), **kw)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    if not _kernel_applies(q, meta):
        return _sdpa(q, k, v, meta)
    from flash_attn import flash_attn_varlen_func  # optional GPU extra, imported lazily

    kw = {"causal": True, "window_size": _causal_window(meta)}
    return _over_documents(q, k, v, meta, flash_attn_varlen_func, **kw)


def _flash4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    if not _kernel_applies(q, meta):
        return _sdpa(q, k, v, meta)
    assert meta.cu_seqlens is not None
    # window: keys before the query (None = unbounded); causal fixes the right side at 0
    left = None if meta.window is None else meta.window - 1
    out = _flash4_kernel(_flat(q), _flat(k), _flat(v), meta.cu_seqlens, meta.max_seqlen, left)
    return out.reshape(q.shape)


@torch.compiler.disable  # type: ignore[untyped-decorator,unused-ignore]  # CuTe DSL kernel: called as is from compiled blocks, never traced
def _flash4_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_seqlen: int,
    left: int | None,
) -> torch.Tensor:
    from flash_attn.cute import flash_attn_varlen_func  # optional GPU extra, imported lazily

    # keyword arguments (the positional order differs from flash-attn 2); grouped-query heads
    # are native; it returns (out, lse)
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        causal=True,
        window_size=(left, 0),
    )
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def _kernel_applies(q: torch.Tensor, meta: AttnMeta) -> bool:
    """The varlen kernels take packed prefill in half precision; KV-cache decode steps and fp32
    inputs take the masked sdpa path instead."""
    return (
        meta.cu_seqlens is not None
        and not meta.q_offset
        and meta.q_slots is None
        and q.dtype in (torch.float16, torch.bfloat16)
    )


def _causal_window(meta: AttnMeta) -> tuple[int, int]:
    """Causal attention as a window: (keys before the query, keys after it); -1 = unbounded."""
    return (-1 if meta.window is None else meta.window - 1, 0)


def _over_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, fn: Any, **kw: Any
) -> torch.Tensor:
    """A varlen kernel over the flattened documents: (B*T, h, hd) tensors + cu_seqlens."""
    cu, mx = meta.cu_seqlens, meta.max_seqlen
    out = fn(_flat(q), _flat(k), _flat(v), cu, cu, mx, mx, **kw)
    return out.reshape(q.shape)
