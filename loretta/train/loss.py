"""Per-token cross-entropy, and the same loss fused with the output projection.

    cross_entropy_per_token(logits, targets)            (B, T, V), (B, T) -> (B*T,) fp32
    linear_cross_entropy(h, weight, targets, impl=...)  (N, d), (V, d), (N,) -> (N,) fp32

Both give 0 where the target is IGNORE. The fused form never holds the (N, V) logits at once: it
runs over chunks of tokens and keeps one fp32 log-sum-exp per token; it computes the gradients
chunk by chunk in forward (stored: grad_h (N, d) and grad_w (V, d)) and, when the upstream
gradient is not one value for every counted token, recomputes each chunk's logits in backward.
On CUDA a library kernel may replace it: cut-cross-entropy (`cce`) or liger-kernel (`liger`).

Pure torch: imported by the decoder, which computes the loss inside its forward so that a ZeRO-3
engine has the output weight gathered while it is used.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from loretta.optional import import_problem

IGNORE = -100  # target value that carries no loss (loretta.data.sequences.IGNORE)
LossImpl = Literal["auto", "chunked", "torch", "liger", "cce"]
LOSS_IMPLS: tuple[str, ...] = ("auto", "chunked", "torch", "liger", "cce")
_LOGIT_BUDGET = 2**25  # fp32 logits per chunk (128 MiB): tokens per chunk = budget / V


def cross_entropy_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B*T,) losses in fp32 (0 where target is IGNORE). The reference:
    it materialises fp32 logits for the whole batch."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )


def default_chunk(vocab: int) -> int:
    """Tokens per chunk: a power of two near _LOGIT_BUDGET / vocab, at least 64."""
    n = max(64, _LOGIT_BUDGET // max(vocab, 1))
    return 1 << (n.bit_length() - 1)


class _ChunkedLinearCE(torch.autograd.Function):
    """h (N, d), w (V, d), targets (N,) -> losses (N,) fp32, one chunk of logits at a time.

    With `eager_grads` the forward also computes each token's unscaled gradient (softmax minus
    one-hot) and projects it at once: grad_h_unit (N, d) and grad_w_unit (V, d), summed over
    tokens, as liger-kernel does. Backward then scales them: exact for grad_h with any upstream
    gradient (rows are independent), and for grad_w when the upstream gradient is the same for
    every counted token (a mean over valid tokens, what training does). Any other upstream
    gradient recomputes the chunks' logits instead (one extra matmul), so the result is always
    exact."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: torch.Tensor,
        w: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        eager_grads: bool,
    ) -> torch.Tensor:
        N = h.shape[0]
        losses = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        valid = targets != IGNORE
        safe = torch.where(valid, targets, 0)
        gh = torch.empty_like(h) if eager_grads else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if eager_grads else None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            logits = (h[s:e] @ w.t()).float()  # (n, V): the only large tensor, one chunk
            tgt = logits.gather(1, safe[s:e, None]).squeeze(1)
            logp = torch.log_softmax(logits, dim=-1)  # one fused pass; logits freed below
            del logits
            logp_t = logp.gather(1, safe[s:e, None]).squeeze(1)
            lse[s:e] = tgt - logp_t
            losses[s:e] = torch.where(valid[s:e], -logp_t, 0.0)
            if gh is not None and gw is not None:
                # softmax - onehot, in place over logp (0 for ignored rows)
                scale = valid[s:e, None].to(logp.dtype)
                dl = logp.exp_().mul_(scale)
                dl.scatter_add_(1, safe[s:e, None], -scale)
                dl = dl.to(h.dtype)
                gh[s:e] = dl @ w
                if dl.dtype == gw.dtype:  # fp32: accumulate in place
                    gw.addmm_(dl.t(), h[s:e])
                else:  # half precision matmul, accumulated in fp32 over chunks
                    gw += (dl.t() @ h[s:e]).float()
        ctx.save_for_backward(h, w, safe, valid, lse, gh, gw)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        h, w, safe, valid, lse, gh, gw = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = torch.where(valid, grad_out.float(), 0.0)  # (N,) upstream, 0 where ignored
        if gh is not None and gw is not None:
            counted = grad_out.float()[valid]
            # one host sync a micro-step (CPU, or CUDA without a library kernel)
            if counted.numel() == 0 or bool((counted == counted[0]).all()):
                g0 = counted[0] if counted.numel() else counted.new_zeros(())
                grad_h = (gh.float() * g[:, None]).to(h.dtype) if need_h else None
                grad_w = (gw * g0).to(w.dtype) if need_w else None
                return grad_h, grad_w, None, None, None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        chunk = ctx.chunk
        for s in range(0, h.shape[0], chunk):
            e = min(s + chunk, h.shape[0])
            logits = (h[s:e] @ w.t()).float()  # recomputed
            dl = _logit_grad(logits, lse[s:e], safe[s:e], g[s:e], h.dtype)
            if grad_h is not None:
                grad_h[s:e] = dl @ w
            if grad_w is not None:
                if dl.dtype == grad_w.dtype:
                    grad_w.addmm_(dl.t(), h[s:e])
                else:
                    grad_w += (dl.t() @ h[s:e]).float()
        return grad_h, (grad_w.to(w.dtype) if grad_w is not None else None), None, None, None


def _logit_grad(
    logits: torch.Tensor,
    lse: torch.Tensor,
    safe: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """d loss / d logits = (softmax - onehot) * scale, per row; overwrites `logits`."""
    dl = logits.sub_(lse[:, None]).exp_().mul_(scale[:, None])
    dl.scatter_add_(1, safe[:, None], -scale[:, None])
    return dl.to(dtype)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def chunked_linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 0,
    eager_grads: bool = True,
) -> torch.Tensor:
    """(N, d), (V, d), (N,) -> (N,) fp32 per-token losses, in chunks of `chunk` tokens (0: from
    the vocabulary size). Under autocast the matmuls run in the autocast dtype, like F.linear.
    `eager_grads`: compute the gradients in forward (see _ChunkedLinearCE); only when a
    backward can follow."""
    eager_grads = eager_grads and torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    dt = _autocast_dtype(h.device)
    if dt is not None:
        h, w = h.to(dt), w.to(dt)  # differentiable casts, outside the Function
    elif h.dtype != w.dtype:
        h = h.to(w.dtype)
    with torch.autocast(h.device.type, enabled=False):
        out: torch.Tensor = _ChunkedLinearCE.apply(
            h, w, targets, chunk or default_chunk(w.shape[0]), eager_grads
        )
    return out


def impl_available(name: str, device: torch.device) -> tuple[bool, str]:
    """(available, reason if not) for loss implementation `name` on `device`."""
    if name in ("chunked", "torch"):
        return True, ""
    pkg = {
        "liger": ("liger_kernel", "liger-kernel"),
        "cce": ("cut_cross_entropy", "cut-cross-entropy"),
    }
    if name not in pkg:
        return False, f"unknown loss implementation {name!r}; choose one of {LOSS_IMPLS}"
    if device.type != "cuda":
        return False, f"'{name}' runs on CUDA only (device is {device.type})"
    problem = import_problem(pkg[name][0], f"pip install {pkg[name][1]}")
    return (False, problem) if problem else (True, "")


def resolve_loss_impl(name: str, device: torch.device) -> str:
    """'auto' -> liger-kernel on CUDA when it imports, else 'chunked'; cut-cross-entropy only
    when asked for ('cce': its gradients are approximate, see linear_cross_entropy); an
    unavailable explicit choice is an error."""
    if name == "auto":
        return "liger" if impl_available("liger", device)[0] else "chunked"
    ok, why = impl_available(name, device)
    if not ok:
        raise ValueError(
            f"model.loss_impl={name!r} is not available: {why}. Use 'auto' or 'chunked'."
        )
    return name


def linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    impl: str = "chunked",
    chunk: int = 0,
) -> torch.Tensor:
    """Per-token losses (N,) fp32 of logits h @ w.T against targets (0 where IGNORE).

    h: (..., d) flattened to (N, d); targets: (...) flattened to (N,). `impl` is a resolved
    name (see resolve_loss_impl)."""
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    if impl == "chunked":
        return chunked_linear_cross_entropy(h, w, targets, chunk)
    if impl == "torch":
        return cross_entropy_per_token(F.linear(h, w), targets)
    dt = _autocast_dtype(h.device) or w.dtype
    if dt == torch.float32:  # the kernels want half precision; fp32 runs stay exact
        return chunked_linear_cross_entropy(h, w, targets, chunk)
    h, w = h.to(dt), w.to(dt)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce  # optional GPU extra

        # filter_eps=None: no vocabulary entries skipped. Its gradients stay approximate all the
        # same: cut-cross-entropy 25.1 adds each vocabulary block's share of dh and dW into a
        # tensor of h's dtype (bf16), so 0.3% of dh moved by up to 0.14 against the chunked loss
        # with or without filtering (H200, 2026-11-29 and -30). Hence 'auto' never picks it.
        out: torch.Tensor = cce(
            h, w, targets, ignore_index=IGNORE, reduction="none", filter_eps=None
        )
        return out.float()
    if impl == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import (  # optional GPU extra
            LigerFusedLinearCrossEntropyFunction,
        )

        # positional: (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        # label_smoothing, reduction); liger >= 0.8 recomputes per-token grads for "none"
        res = LigerFusedLinearCrossEntropyFunction.apply(
            h, w, targets, None, None, IGNORE, 0.0, 0.0, "none"
        )
        loss = res[0] if isinstance(res, tuple) else res
        return loss.float()
    raise ValueError(f"unknown loss implementation {impl!r}; choose one of {LOSS_IMPLS}")
