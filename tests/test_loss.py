"""The fused (chunked) linear + cross-entropy equals the reference on full logits: per-token
losses and gradients, fp32 and bf16 autocast, alone and inside the decoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loretta.data.sequences import IGNORE as DATA_IGNORE
from loretta.model import Decoder, DecoderConfig
from loretta.train.loss import (
    IGNORE,
    cross_entropy_per_token,
    default_chunk,
    linear_cross_entropy,
    resolve_loss_impl,
)

ROOT = Path(__file__).resolve().parents[1]


def inputs(
    N: int = 50, d: int = 16, V: int = 37, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = IGNORE
    return h, w, t


def test_ignore_is_the_data_paths_ignore() -> None:
    assert IGNORE == DATA_IGNORE


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_losses_and_grads_equal_reference_fp32(chunk: int) -> None:
    h, w, t = inputs()
    up = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(5))  # per-token weights
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = cross_entropy_per_token((h1 @ w1.t())[None], t[None])
    (ref * up).sum().backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_cross_entropy(h2, w2, t, "chunked", chunk)
    (out * up).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (h.shape[0],)
    assert (out[t == IGNORE] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)


def test_chunked_under_bf16_autocast() -> None:
    h, w, t = inputs(N=96, d=32, V=101)
    grads = []
    outs = []
    for fused in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = linear_cross_entropy(hh, ww, t, "chunked", 16)
            else:
                out = cross_entropy_per_token(torch.nn.functional.linear(hh, ww)[None], t[None])
        out.sum().backward()
        outs.append(out)
        grads.append((hh.grad, ww.grad))
    assert outs[1].dtype == torch.float32
    assert grads[1][0] is not None and grads[1][0].dtype == torch.float32  # fp32 leaves
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_bf16_weights_without_autocast() -> None:
    """DeepSpeed bf16 runs hold bf16 weights and activations (no autocast)."""
    h, w, t = inputs(N=40, d=32, V=64)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    out = linear_cross_entropy(hb, wb, t, "chunked", 8)
    out.sum().backward()
    assert hb.grad is not None and hb.grad.dtype == torch.bfloat16
    assert wb.grad is not None and wb.grad.dtype == torch.bfloat16
    ref = cross_entropy_per_token((hb.float() @ wb.float().t())[None], t[None])
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tie", [False, True])
def test_decoder_fused_loss_equals_logits_path(tie: bool) -> None:
    cfg = DecoderConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, tie_embeddings=tie)
    cfg.loss_chunk = 13
    ref_m, m = Decoder(cfg), Decoder(cfg)
    m.load_state_dict(ref_m.state_dict())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    tgt = torch.randint(0, 97, (3, 20), generator=g)
    tgt[:, :5] = IGNORE
    ref = cross_entropy_per_token(ref_m(ids), tgt)
    out = m(ids, targets=tgt)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    n = (tgt != IGNORE).sum()
    (ref.sum() / n).backward()
    (out.sum() / n).backward()
    for (name, a), b in zip(ref_m.named_parameters(), m.parameters()):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    # one optimizer step leaves the same parameters
    for mod in (ref_m, m):
        torch.optim.SGD(mod.parameters(), lr=0.1).step()
    for (name, a), b in zip(ref_m.named_parameters(), m.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_impl_resolution_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_loss_impl("auto", cpu) == "chunked"
    assert resolve_loss_impl("torch", cpu) == "torch"
    for name in ("cce", "liger"):
        with pytest.raises(ValueError, match=f"loss_impl='{name}'.*CUDA"):
            resolve_loss_impl(name, cpu)
    assert default_chunk(32000) == 1024 and default_chunk(10) == 2**21


def test_torch_impl_is_the_reference() -> None:
    h, w, t = inputs()
    torch.testing.assert_close(
        linear_cross_entropy(h, w, t, "torch"), cross_entropy_per_token((h @ w.t())[None], t[None])
    )


def test_loss_memory_bench_tiny() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loss_memory.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["peak_mem_ratio"] > 0 and res["time_ratio"] > 0
    assert res["max_abs_loss_diff"] < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["cce", "liger"])
def test_library_kernels_match_chunked_on_cuda(impl: str) -> None:
    dev = torch.device("cuda")
    try:
        resolve_loss_impl(impl, dev)
    except ValueError as e:
        pytest.skip(str(e))
    h, w, t = inputs(N=4096, d=256, V=32000)
    res = []
    for name in ("chunked", impl):
        hh = h.to(dev, torch.bfloat16).requires_grad_()
        ww = w.to(dev, torch.bfloat16).requires_grad_()
        out = linear_cross_entropy(hh, ww, t.to(dev), name)
        (out * torch.linspace(0.5, 1.5, len(out), device=dev)).sum().backward()
        res.append((out.float(), hh.grad.float(), ww.grad.float()))  # type: ignore[union-attr]
    (loss_a, *grads_a), (loss_b, *grads_b) = res
    torch.testing.assert_close(loss_b, loss_a, rtol=3e-2, atol=3e-2)
    if impl == "liger":  # what 'auto' picks: gradients match element by element
        assert resolve_loss_impl("auto", dev) == "liger"
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2)
    else:  # cce adds its vocabulary blocks' dh and dW in bf16: close as a whole, not per element
        for a, b in zip(grads_a, grads_b):
            assert float((b - a).norm() / a.norm()) < 2e-2
