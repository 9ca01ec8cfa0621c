"""Decoder correctness: causality, packed-document isolation, backend agreement, KV cache,
sliding window, and logit parity with Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch

from loretta.model import AttentionBackendError, Decoder, DecoderConfig, resolve_backend
from loretta.model.generate import SamplingConfig, generate
from loretta.model.hf import hf_config, to_hf

CPU_BACKENDS = ["eager", "sdpa"]


def make(seed: int = 0, **kw: object) -> Decoder:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    base.update(kw)  # type: ignore[arg-type]
    m = Decoder(DecoderConfig(**base))  # type: ignore[arg-type]
    m.init_weights(seed)
    return m.eval()


def packed(
    B: int = 2, lens: tuple[int, ...] = (5, 9, 6)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = sum(lens)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (B, T), generator=g)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).expand(B, T)
    pos = torch.cat([torch.arange(n) for n in lens]).expand(B, T)
    return ids, pos.contiguous(), doc.contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [None, 4])
def test_causality(backend: str, window: int | None) -> None:
    m = make(sliding_window=window)
    m.backend = backend
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    base = m(ids)
    for t in (3, 9, 15):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out = m(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"future token {t} changed earlier logits"
        assert not torch.allclose(out[:, t], base[:, t]), "the changed token itself must matter"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_documents_never_see_each_other(backend: str) -> None:
    m = make()
    m.backend = backend
    ids, pos, doc = packed()
    base = m(ids, pos, doc)
    # change document 2 (tokens 5..13): documents 1 and 3 are untouched
    changed = ids.clone()
    changed[:, 5:14] = (changed[:, 5:14] + 7) % 97
    out = m(changed, pos, doc)
    assert torch.equal(out[:, :5], base[:, :5])
    assert torch.equal(out[:, 14:], base[:, 14:])
    assert not torch.allclose(out[:, 5:14], base[:, 5:14])
    # and each document's logits equal those of the document run alone
    for lo, hi in ((0, 5), (5, 14), (14, 20)):
        alone = m(ids[:, lo:hi])
        torch.testing.assert_close(base[:, lo:hi], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw", [{}, {"sliding_window": 3}, {"n_kv_heads": 1}, {"tie_embeddings": True}]
)
def test_eager_and_sdpa_agree(kw: dict[str, object]) -> None:
    m = make(**kw)
    ids, pos, doc = packed()
    outs = {}
    for backend in CPU_BACKENDS:
        m.backend = backend
        outs[backend] = (m(ids, pos, doc), m(ids))
    for a, b in zip(outs["eager"], outs["sdpa"]):
        rel = (a - b).norm() / b.norm()
        assert rel <= 1e-5, f"eager vs sdpa relative error {rel:.2e}"


def test_sliding_window_limits_reach() -> None:
    m = make(sliding_window=4, n_layers=1)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    base = m(ids)
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 97
    out = m(changed)
    # one layer, window 4: token 2 is visible to queries 2..5 only
    assert not torch.allclose(out[:, 5], base[:, 5])
    assert torch.equal(out[:, 6:], base[:, 6:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_decoding_equals_full_forward(backend: str) -> None:
    from loretta.model import KVCache

    m = make(sliding_window=5)
    m.backend = backend
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(4))
    full = m(ids)
    cache = KVCache.empty(m.cfg, 2, 14, torch.device("cpu"), torch.float32)
    steps = [m(ids[:, :6], cache=cache)]  # prefill
    for t in range(6, 14):
        steps.append(m(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_generation_cached_equals_uncached_and_stays_in_range() -> None:
    m = make()
    prompts = [
        torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 8, 5)
    ]
    cfg = SamplingConfig(max_new_tokens=12, allowed=(40, 60), stop_ids=(2,), top_k=10)
    a, la = generate(m, prompts, cfg, torch.Generator().manual_seed(0), use_cache=True)
    b, lb = generate(m, prompts, cfg, torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a, b) and torch.equal(la, lb)
    for row, n in zip(a, la):
        assert ((row[:n] >= 40) & (row[:n] < 60)).all()
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    out, _ = generate(m, prompts[:1], greedy)
    seq = prompts[0].clone()
    for t in range(6):  # greedy continuation equals argmax of full forwards
        nxt = m(seq[None])[0, -1].argmax()
        assert int(nxt) == int(out[0, t])
        seq = torch.cat([seq, nxt[None]])


def test_backend_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    for name in ("varlen", "flash_attn", "flash_attn_4"):
        with pytest.raises(AttentionBackendError, match=f"attn_backend='{name}'.*CUDA"):
            resolve_backend(name, cpu)


def test_scaled_residual_init_and_determinism() -> None:
    a, b = make(seed=5), make(seed=5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    std_wo = a.layers[0].attention.wo.weight.std().item()
    std_wq = a.layers[0].attention.wqkv.weight.std().item()
    assert abs(std_wq - 0.02) < 0.003
    assert abs(std_wo - 0.02 / (2 * 2) ** 0.5) < 0.002


# ---- parity with Hugging Face -----------------------------------------------------------------
@pytest.mark.parametrize(
    "kw", [{}, {"tie_embeddings": True}, {"sliding_window": 6}, {"n_kv_heads": 4}]
)
def test_logit_parity_with_transformers(kw: dict[str, object]) -> None:
    transformers = pytest.importorskip("transformers")
    m = make(**kw)
    cfg = m.cfg
    hc = hf_config(cfg)
    arch = hc["architectures"][0]
    config_cls = (
        transformers.MistralConfig if arch.startswith("Mistral") else transformers.LlamaConfig
    )
    hf_cfg = config_cls(
        **{k: v for k, v in hc.items() if k not in ("architectures", "model_type", "torch_dtype")}
    )
    hf_cfg._attn_implementation = "eager"
    hf = getattr(transformers, arch)(hf_cfg).eval()
    sd = {}
    for name, t in m.state_dict().items():
        sd.update(dict(to_hf(name, t, cfg)))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) == ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if cfg.tie_embeddings:
        hf.tie_weights()
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = m(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5


# ---- CUDA-only backends (run on a GPU machine: pytest -m gpu) ----------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["varlen", "flash_attn", "flash_attn_4"])
@pytest.mark.parametrize("window", [None, 4])
def test_cuda_backends_agree_and_isolate_documents(backend: str, window: int | None) -> None:
    dev = torch.device("cuda")
    try:
        resolve_backend(backend, dev)
    except AttentionBackendError as e:
        pytest.skip(str(e))
    m = make(sliding_window=window).to(dev)
    ids, pos, doc = (t.to(dev) for t in packed())
    m.backend = "eager"
    ref = m(ids, pos, doc)
    m.set_backend(backend, dev)
    # fp32 inputs take the masked sdpa path (the kernels are half precision only): still correct
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = m(ids, pos, doc).float()
        assert (out - ref).abs().max() / ref.abs().max() < tol
    # gradients too (training runs the kernel's backward): bf16 kernel vs fp32 eager
    grads = []
    for name in ("eager", backend):
        m.zero_grad()
        if name == "eager":
            m.backend = "eager"
        else:
            m.set_backend(backend, dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name != "eager"):
            m(ids, pos, doc).float().pow(2).mean().backward()
        grads.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                    for p in m.parameters()
                ]
            )
        )
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 5e-2
    with torch.autocast("cuda", dtype=torch.bfloat16):
        base = m(ids, pos, doc)
        changed = ids.clone()
        changed[:, 5:14] = (changed[:, 5:14] + 7) % 97
        out = m(changed, pos, doc)
        assert torch.equal(out[:, :5], base[:, :5]) and torch.equal(out[:, 14:], base[:, 14:])
        c2 = ids.clone()
        c2[:, 3] = (c2[:, 3] + 1) % 97
        assert torch.equal(m(c2, pos, doc)[:, :3], base[:, :3])  # causality


# ---- the varlen adapter across torch releases (the kernel itself is CUDA-only) -------------------
def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window=(-1, 0), gqa=False):  # type: ignore[no-untyped-def]
    """varlen_attn's contract in plain torch: (N, h, hd) inputs, causal within each document."""
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv:
        assert gqa, "a kernel without enable_gqa needs equal head counts"
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        i = torch.arange(b - a)
        keep = i[:, None] >= i[None, :]
        if window[0] >= 0:
            keep &= i[:, None] - i[None, :] <= window[0]
        s = (q[a:b].transpose(0, 1) @ k[a:b].transpose(0, 1).transpose(-2, -1)) / q.shape[-1] ** 0.5
        p = s.masked_fill(~keep, float("-inf")).softmax(-1)
        out[a:b] = (p @ v[a:b].transpose(0, 1)).transpose(0, 1)
    return out


def _kernel_2_10(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False):  # type: ignore[no-untyped-def]
    assert is_causal
    return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k)


def _kernel_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1)):  # type: ignore[no-untyped-def]
    return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window=window_size)


def _kernel_2_14(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):  # type: ignore[no-untyped-def]
    return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window=window_size, gqa=enable_gqa)


@pytest.mark.parametrize("kernel", [_kernel_2_10, _kernel_2_11, _kernel_2_14])
@pytest.mark.parametrize("window", [None, 4])
def test_varlen_adapter_matches_eager_on_each_torch_api(
    kernel: object, window: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's varlen_attn changed its keywords in 2.11 and again later (GQA); the adapter must
    call each correctly. A bug here once crashed every CUDA run on torch 2.11."""
    import functools

    from loretta.model import attention as A

    calls = []

    @functools.wraps(kernel)  # type: ignore[arg-type]
    def counted(*args, **kw):  # type: ignore[no-untyped-def]
        calls.append(args[0].dtype)
        return kernel(*args, **kw)  # type: ignore[operator]

    monkeypatch.setattr(A, "_varlen_fn", lambda: counted)
    A._varlen_params.cache_clear()
    try:
        cuda = torch.device("cuda")  # a device object only: nothing runs on it
        ok, why = A.backend_available("varlen", cuda, window)
        if kernel is _kernel_2_10 and window is not None:
            assert not ok and "sliding window" in why
            assert A.resolve_backend("auto", cuda, window) == "sdpa"
            return
        assert ok, why
        m = make(sliding_window=window)
        ids, pos, doc = packed()
        m = m.to(torch.bfloat16)  # the kernels take half precision only (fp32 goes to sdpa)
        m.backend = "eager"
        ref = m(ids, pos, doc).float()
        m.backend = "varlen"
        assert (m(ids, pos, doc).float() - ref).abs().max() / ref.abs().max() < 3e-2
        assert calls and set(calls) == {torch.bfloat16}  # the kernel ran, once per layer
        n = len(calls)
        m.float()(ids, pos, doc)  # fp32: the masked sdpa path, not the kernel
        assert len(calls) == n
    finally:
        A._varlen_params.cache_clear()


def test_flash_attn_4_adapter_calls_the_cute_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    """flash-attn-4 (flash_attn.cute) takes keywords, native GQA, window (left or None, 0) and
    returns (out, lse): the adapter must call it so, checked here against a stand-in."""
    import sys
    import types

    calls = []

    def fake(
        q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size
    ):  # type: ignore[no-untyped-def]
        calls.append(window_size)
        assert causal and window_size[1] == 0 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        left = -1 if window_size[0] is None else window_size[0]
        out = _reference_varlen(
            q.float(),
            k.float(),
            v.float(),
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            window=(left, 0),
            gqa=True,
        )
        return out.to(q.dtype), None

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_varlen_func = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    for window in (None, 4):
        ids, pos, doc = packed()
        m = make(sliding_window=window)
        m.backend = "eager"
        ref = m(ids, pos, doc)
        m.backend = "flash_attn_4"
        out = m.to(torch.bfloat16)(ids, pos, doc).float()  # bf16 weights, as under DeepSpeed
        assert (out - ref).abs().max() / ref.abs().max() < 3e-2
        assert calls[-1] == (None if window is None else window - 1, 0)


@pytest.mark.gpu
def test_flash_attn_4_matches_sdpa_on_cuda() -> None:
    dev = torch.device("cuda")
    try:
        resolve_backend("flash_attn_4", dev)
    except AttentionBackendError as e:
        pytest.skip(str(e))
    m = make(dim=256, n_heads=4, n_kv_heads=2).to(dev, torch.bfloat16)  # head dim 64, as DS bf16
    ids, pos, doc = (t.to(dev) for t in packed())
    m.set_backend("sdpa", dev)
    ref = m(ids, pos, doc).float()
    m.set_backend("flash_attn_4", dev)
    out = m(ids, pos, doc).float()
    assert (out - ref).abs().max() / ref.abs().max() < 3e-2


@pytest.mark.parametrize("tq", [1, 3, 24])
def test_grouped_heads_without_copies_give_the_same_bits(tq: int) -> None:
    """The masked sdpa path on the CPU takes grouped key/value heads as they are when no
    gradient is needed (decoding), and copies them per query head otherwise: the same output,
    bit for bit, at decode (tq = 1) and prefill shapes."""
    from loretta.model.attention import AttnMeta, attention

    g = torch.Generator().manual_seed(tq)
    B, tk, H, hkv, hd = 5, 24, 8, 2, 16
    q = torch.randn(B, tq, H, hd, generator=g)
    k, v = torch.randn(B, tk, hkv, hd, generator=g), torch.randn(B, tk, hkv, hd, generator=g)
    doc = torch.randint(0, 2, (B, tk), generator=g).sort(dim=1).values
    meta = AttnMeta(doc_ids=doc[:, tk - tq :], k_doc_ids=doc, q_offset=tk - tq)
    with torch.no_grad():
        fast = attention(q, k, v, meta, "sdpa")
    copied = attention(q.clone().requires_grad_(), k, v, meta, "sdpa")  # the copying path
    assert torch.equal(fast, copied.detach())
