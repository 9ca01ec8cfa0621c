"""Evaluation utilities: conditional likelihood (with a shared prefix cache) equals a plain
teacher-forced computation; calibration, pooled features and the linear probe behave."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loretta.eval import (
    conditional_logprob,
    encode,
    generate_modality,
    linear_probe,
    pooled_features,
    unconditional_logprob,
    zero_shot,
)
from loretta.model import Decoder, DecoderConfig
from loretta.vocab import VocabLayout

LAY = VocabLayout.build({"a": 10, "b": 12}, fixed_lengths={"b": 4})


def model() -> Decoder:
    m = Decoder(DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2))
    m.init_weights(3)
    return m.eval()


def brute(m: Decoder, cond: tuple[str, np.ndarray], tgt: tuple[str, np.ndarray]) -> float:
    pre = encode(LAY, [cond], open_=tgt[0])
    seq = np.concatenate([pre, tgt[1] + LAY[tgt[0]].offset])
    lp = F.log_softmax(m(torch.from_numpy(seq)[None]), -1)[0]
    return sum(lp[j - 1, seq[j]].item() for j in range(len(pre), len(seq)))


def test_conditional_logprob_matches_teacher_forcing() -> None:
    m, rng = model(), np.random.default_rng(0)
    conds = [("a", rng.integers(0, 10, int(rng.integers(2, 9)))) for _ in range(3)]
    tgts = [("b", rng.integers(0, 12, int(rng.integers(1, 7)))) for _ in range(5)]
    got = conditional_logprob(m, LAY, conds, tgts, batch_size=2, normalize=False)
    want = np.array([[brute(m, c, t) for t in tgts] for c in conds])
    assert np.abs(got - want).max() < 1e-4
    norm = conditional_logprob(m, LAY, conds, tgts, normalize=True)
    assert np.allclose(norm, want / np.array([len(t[1]) for t in tgts])[None], atol=1e-5)


def test_calibration_subtracts_the_unconditional_likelihood() -> None:
    m, rng = model(), np.random.default_rng(1)
    tgts = [("b", rng.integers(0, 12, 4)) for _ in range(4)]
    u = unconditional_logprob(m, LAY, tgts)
    for t, ut in zip(tgts, u):
        seq = encode(LAY, [t])
        lp = F.log_softmax(m(torch.from_numpy(seq)[None]), -1)[0]
        assert abs(ut - np.mean([lp[j - 1, seq[j]].item() for j in range(2, len(seq))])) < 1e-5
    items = [("a", rng.integers(0, 10, 5)) for _ in range(6)]
    protos = {c: [tgts[c]] for c in range(4)}
    _, plain = zero_shot(m, LAY, items, protos)
    _, cal = zero_shot(m, LAY, items, protos, calibrate=True)
    assert np.allclose(plain - cal, u[None, :], atol=1e-6)


def test_pooled_features_and_probe() -> None:
    m, rng = model(), np.random.default_rng(2)
    docs = [[("a", rng.integers(0, 10, 6)), ("b", rng.integers(0, 12, 4))] for _ in range(5)]
    f = pooled_features(m, LAY, docs, batch_size=2)
    assert f.shape == (5, 32)
    seq = torch.from_numpy(encode(LAY, docs[1]))[None]
    assert np.allclose(f[1], m(seq, return_hidden=True)[0].mean(0).detach().numpy(), atol=1e-5)
    x = rng.normal(size=(400, 8))
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)  # linearly separable
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]) > 0.85
    assert linear_probe(x[:100], rng.integers(0, 4, 100), x[100:], y[100:]) < 0.5


def test_generate_modality_fixed_length_in_range() -> None:
    out = generate_modality(model(), LAY, [("a", np.arange(5))] * 3, "b", seed=0)
    assert all(len(o) == 4 and ((o >= 0) & (o < 12)).all() for o in out)


def test_probe_cli_on_a_trained_checkpoint(tmp_path: Path, tiny_data: Path) -> None:
    """`loretta-eval probe` on a checkpoint of a short real run, with a held-out test set: the
    JSON it prints is the probe computed here from the same checkpoint."""
    from dataclasses import replace

    from helpers import BIN, REPO, base_env, tiny_overrides, torchrun

    from loretta.checkpoint.load import load_model
    from loretta.config import load_config
    from loretta.data.synthetic import ensure_synthetic
    from loretta.eval import labelled

    over = tiny_overrides(tmp_path, steps=10, data=tiny_data, **{"optim.warmup_steps": 2})
    torchrun(1, ["--config", "tiny", *over])
    syn = load_config("tiny").data.sources[0].synthetic
    assert syn is not None
    test = tmp_path / "heldout"  # same class patterns, other samples
    ensure_synthetic(test, replace(syn, seed=99, samples=300, samples_per_shard=300))
    ckpt = tmp_path / "run" / "checkpoints"
    args = ["probe", str(ckpt), "--train", str(tiny_data), "--test", str(test)]
    res = subprocess.run(
        [str(BIN / "loretta-eval"), *args, "--modalities", "a,b", "--limit", "400"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=base_env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["task"] == "probe[a,b]" and out["n"] == 300

    model, layout = load_model(ckpt)
    (tr, ytr), (te, yte) = (
        labelled(str(tiny_data), ["a", "b"], 400),
        labelled(str(test), ["a", "b"], 400),
    )
    feats = [
        pooled_features(model, layout, [[(m, s[m]) for m in ("a", "b")] for s in samples])
        for samples in (tr, te)
    ]
    # equal up to one test sample (thread counts differ: the last bits of the features may too)
    assert abs(out["accuracy"] - linear_probe(feats[0], ytr, feats[1], yte)) <= 1 / 300 + 1e-9
    assert out["accuracy"] > 0.5  # ten classes: chance is 0.1
