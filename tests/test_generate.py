"""Generation: the same tokens as before sampling moved onto the device (recorded for a fixed
seed and model), no host sync per token, and a device generator seeded from a host one."""

from __future__ import annotations

import pytest
import torch

from loretta.model import Decoder, DecoderConfig
from loretta.model.generate import SamplingConfig, device_generator, generate

# recorded with the host-sampling generate (commit 83ae77b) for make() below, prompts of
# lengths 3, 8, 5, 1 and generator seed 123; fixed_steps gave the same tokens
RECORDED = [
    (
        SamplingConfig(
            max_new_tokens=12, allowed=(40, 60), stop_ids=(2, 45), top_k=10, min_new_tokens=2
        ),
        [
            [50, 59, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [58, 58, 53, 54, 42, 50, 55, 40, 44, 46, 55, 0],
            [55, 58, 52, 46, 0, 0, 0, 0, 0, 0, 0, 0],
            [48, 44, 41, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        [2, 11, 4, 3],
    ),
    (
        SamplingConfig(max_new_tokens=9, temperature=0.7),
        [
            [1, 30, 13, 84, 54, 20, 2, 18, 95],
            [25, 71, 68, 31, 78, 21, 62, 25, 11],
            [88, 64, 47, 89, 8, 43, 79, 16, 79],
            [1, 75, 41, 78, 52, 31, 63, 19, 10],
        ],
        [9, 9, 9, 9],
    ),
    (
        SamplingConfig(max_new_tokens=7, temperature=0.0, allowed=(10, 30)),
        [
            [13, 14, 17, 13, 14, 17, 13],
            [23, 23, 23, 23, 23, 23, 23],
            [17, 13, 15, 21, 11, 20, 22],
            [16, 27, 10, 25, 29, 10, 25],
        ],
        [7, 7, 7, 7],
    ),
]


def make() -> Decoder:
    m = Decoder(DecoderConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    m.init_weights(0)
    return m.eval()


def prompts() -> list[torch.Tensor]:
    return [
        torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 8, 5, 1)
    ]


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("case", range(len(RECORDED)))
def test_same_tokens_as_recorded(case: int, fixed: bool) -> None:
    cfg, out, lens = RECORDED[case]
    got, got_lens = generate(
        make(), prompts(), cfg, torch.Generator().manual_seed(123), fixed_steps=fixed
    )
    assert got.tolist() == out and got_lens.tolist() == lens


def test_no_host_sync_per_token_with_fixed_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """bool(tensor), .item() and .cpu() are host syncs on CUDA: none may run per token."""
    calls = {"n": 0}
    for name in ("__bool__", "item", "cpu", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *a: object, _orig: object = orig, **k: object) -> object:
            calls["n"] += 1
            return _orig(self, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, counting)
    cfg = SamplingConfig(max_new_tokens=40, allowed=(10, 60), stop_ids=(2,), top_k=5)
    generate(make(), prompts(), cfg, torch.Generator().manual_seed(1), fixed_steps=True)
    n_fixed = calls["n"]
    calls["n"] = 0
    generate(make(), prompts(), cfg, torch.Generator().manual_seed(1), fixed_steps=True)
    assert calls["n"] == n_fixed and n_fixed < 10  # setup only, independent of the length


def test_device_generator() -> None:
    g = torch.Generator().manual_seed(5)
    assert device_generator(g, torch.device("cpu")) is g
    assert device_generator(None, torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_is_seeded_and_in_range() -> None:
    m = make().cuda()
    cfg, *_ = RECORDED[0]
    a, la = generate(m, prompts(), cfg, torch.Generator().manual_seed(7), fixed_steps=True)
    b, lb = generate(m, prompts(), cfg, torch.Generator().manual_seed(7), fixed_steps=True)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.is_cuda
    for row, n in zip(a.cpu(), la.cpu()):
        assert ((row[:n] >= 40) & (row[:n] < 60)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_decode_runs_in_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled decode step writes the KV cache in place, and CUDA graphs skip a function
    that mutates an input whose address is not static (they ran the step without graphs: 1.13x
    over eager on an H200). Unmarked, the skip is counted; with the cache marked static, two
    calls (two caches: the graphs are re-recorded, not recompiled) run in graphs."""
    from torch._dynamo.utils import counters

    m = make().cuda()
    cfg, *_ = RECORDED[0]

    def skips(mark: bool) -> int:
        torch._dynamo.reset()
        counters.clear()
        with monkeypatch.context() as mp:
            if not mark:  # the code before the fix
                mp.setattr(torch._dynamo, "mark_static_address", lambda t, guard=False: None)
            for seed in (1, 2):
                out, lens = generate(
                    m, prompts(), cfg, torch.Generator().manual_seed(seed), compile_step=True
                )
                for row, n in zip(out.cpu(), lens.cpu()):
                    assert ((row[:n] >= 40) & (row[:n] < 60)).all()
        return int(counters["inductor"]["cudagraph_skips"])

    assert skips(mark=False) > 0  # the counter is live in this torch, and the cause is this
    assert skips(mark=True) == 0


@pytest.mark.parametrize("window", [None, 5])
def test_static_cache_gives_the_same_tokens(window: int | None) -> None:
    m = make()
    if window is not None:
        m = Decoder(
            DecoderConfig(
                vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, sliding_window=window
            )
        ).eval()
    for cfg, *_ in RECORDED:
        a = generate(m, prompts(), cfg, torch.Generator().manual_seed(3), fixed_steps=True)
        b = generate(
            m,
            prompts(),
            cfg,
            torch.Generator().manual_seed(3),
            fixed_steps=True,
            static_cache=True,
        )
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.slow
def test_compiled_decode_step_gives_the_recorded_tokens() -> None:
    """torch.compile(mode="reduce-overhead") decode steps (CUDA graphs on CUDA; plain compiled
    code here) over the static cache: the same tokens."""
    cfg, out, lens = RECORDED[0]
    got, got_lens = generate(
        make(), prompts(), cfg, torch.Generator().manual_seed(123), compile_step=True
    )
    assert got.tolist() == out and got_lens.tolist() == lens


def test_keyed_sampling_does_not_depend_on_the_batch() -> None:
    """With row keys a row's tokens depend on its prompt and key only: the same whether it is
    generated alone, with others, or in another order (what makes a LoReTTa step the same at
    any world size or micro-batch size)."""
    model, ps = make(), prompts()
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, allowed=(20, 80), stop_ids=(2,))
    keys = [11, 2**63 + 5, 7, 2**64 - 1]
    together, lens = generate(model, ps, cfg, None, row_keys=keys)
    for i in range(len(ps)):
        alone, n = generate(model, [ps[i]], cfg, None, row_keys=[keys[i]])
        assert torch.equal(alone[0], together[i]) and n[0] == lens[i], i
    rev, _ = generate(model, ps[::-1], cfg, None, row_keys=keys[::-1])
    assert torch.equal(rev.flip(0), together)
    other, _ = generate(model, ps, cfg, None, row_keys=[k + 1 for k in keys])
    assert not torch.equal(other, together)  # the key is the noise


def test_keyed_sampling_has_the_softmax_distribution() -> None:
    from loretta.model.generate import _sample

    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 1.5
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.8)
    n = 20000
    keys = torch.arange(n, dtype=torch.int64) * 7919 + 3
    ids = _sample(logits.expand(n, 6), cfg, None, 0, None, keys)
    freq = torch.bincount(ids, minlength=6).double() / n
    want = torch.softmax(logits[0].double() / 0.8, -1)
    # binomial standard error at n=20000 is <= 0.0036; 5 sigma
    assert (freq - want).abs().max() < 0.018, (freq, want)


@pytest.mark.parametrize(
    ("image_dec", "text_dec"),
    [
        ((1.0, None), (1.0, None)),
        ((1.0, 1), (1.0, 1)),
        ((1.0, None), (1.0, 1)),
        ((0.5, 4), (0.0, None)),
    ],
    ids=["sampled", "greedy", "sampled-images-greedy-text", "t05-top4-images-t0-text"],
)
def test_one_call_samples_several_modalities_as_separate_calls_would(
    image_dec: tuple[float, int | None], text_dec: tuple[float, int | None]
) -> None:
    """Per-row sampling configs: rows of two modalities (own id range, own stops, own length,
    own temperature and top-k) in one call get the tokens each would get in a call of its own
    modality (what lets a LoReTTa step generate every modality of a wave in one batched call,
    with per-modality decoding)."""
    model, ps = make(), prompts()
    image = SamplingConfig(  # fixed length
        max_new_tokens=9, allowed=(20, 50), temperature=image_dec[0], top_k=image_dec[1]
    )
    text = SamplingConfig(
        max_new_tokens=6,
        allowed=(50, 80),
        stop_ids=(2, 3),
        temperature=text_dec[0],
        top_k=text_dec[1],
    )
    keys = [5, 6, 7, 8]
    rows = [image, text, text, image]
    base = SamplingConfig(max_new_tokens=9, temperature=0.3, top_k=2)  # the rows' decoding wins
    out, lens = generate(model, ps, base, None, fixed_steps=True, row_keys=keys, row_cfgs=rows)
    for i, r in enumerate(rows):
        alone, n = generate(model, [ps[i]], r, None, fixed_steps=True, row_keys=[keys[i]])
        assert int(lens[i]) == int(n[0]) <= r.max_new_tokens, i
        assert torch.equal(out[i, : int(n[0])], alone[0, : int(n[0])]), i
        assert (out[i, int(n[0]) :] == base.pad_id).all(), i  # nothing past its own length
        lo, hi = r.allowed or (0, 0)
        assert ((out[i, : int(n[0])] >= lo) & (out[i, : int(n[0])] < hi)).all(), i
    assert int(lens[0]) == 9 and int(lens[3]) == 9  # fixed-length rows never stop early


def test_a_row_stops_only_on_its_own_stop_ids() -> None:
    """A row without stop ids whose range holds another row's stop ids runs to its length."""
    model, ps = make(), prompts()[:2]
    free = SamplingConfig(max_new_tokens=7, allowed=(2, 4))  # may only sample ids 2 and 3
    stops = SamplingConfig(max_new_tokens=7, allowed=(50, 80), stop_ids=(2, 3))
    base = SamplingConfig(max_new_tokens=7)
    out, lens = generate(model, ps, base, None, fixed_steps=True, row_cfgs=[free, stops])
    assert int(lens[0]) == 7 and ((out[0] == 2) | (out[0] == 3)).all(), (out[0], lens)


def test_greedy_draw_is_the_keyed_gumbel_draw_without_the_noise() -> None:
    """top_k=1 skips top-k and the (N, V) keyed noise: the token is the one the full path
    (mask, temperature, top-k 1, Gumbel-max with keyed noise) draws, before and after the stop
    ids are allowed (min_new_tokens)."""
    from loretta.model import generate as G

    g = torch.Generator().manual_seed(3)
    V, N = 50, 64
    logits = torch.randn(N, V, generator=g) * 3
    keys = torch.arange(N, dtype=torch.int64) * 7919
    for t in (0, 5):
        cfg = SamplingConfig(
            max_new_tokens=8, allowed=(10, 30), stop_ids=(40,), min_new_tokens=3, top_k=1
        )
        masks = G._keep_masks(cfg, V, logits.device)
        fast = G._sample(logits, cfg, None, t, masks, keys)
        full = G._restrict(logits.float(), cfg, t, masks)
        u = G.keyed_uniform(keys, t, V)
        slow = (full.double() - torch.log(-torch.log(u))).argmax(-1)
        assert torch.equal(fast, slow)
        assert ((fast >= 10) & (fast < 30) | ((fast == 40) & (t >= 3))).all()


@pytest.mark.parametrize(
    "dec",
    [(1.0, None), (0.7, None), (1.0, 3), (1.0, 50), (0.0, None), (1.0, 1)],
    ids=["t1", "t07", "top3", "top50", "t0", "greedy"],
)
def test_keyed_draw_on_the_allowed_columns_is_the_full_vocabulary_draw(
    dec: tuple[float, int | None],
) -> None:
    """Keyed draws hash noise and mask logits only for the ids some row may take: the token is
    the one the full-vocabulary draw gives, for every decoding, before and after stop ids are
    allowed, with rows of different ranges in one call."""
    from loretta.model import generate as G

    V = 97
    rows = [
        SamplingConfig(max_new_tokens=4, allowed=(10, 14), temperature=dec[0], top_k=dec[1]),
        SamplingConfig(
            max_new_tokens=4,
            allowed=(40, 60),
            stop_ids=(2,),
            min_new_tokens=2,
            temperature=dec[0],
            top_k=dec[1],
        ),
    ] * 3
    base = SamplingConfig(max_new_tokens=4, temperature=dec[0], top_k=dec[1], min_new_tokens=2)
    masks = G._keep_masks(base, V, torch.device("cpu"), rows)
    assert masks is not None
    keys = torch.tensor([3, 1 << 40, -7, 12345, 99, 5])
    group = G._Group(base, None, masks, keys)
    assert group.ids is not None
    assert group.ids.tolist() == [2, *range(10, 14), *range(40, 60)]
    gen = torch.Generator().manual_seed(0)
    for t in range(6):
        logits = torch.randn(len(rows), V, generator=gen) * 3
        full = G._sample(logits, base, None, t, masks, keys)
        assert torch.equal(group.draw(logits, None, t), full), t
