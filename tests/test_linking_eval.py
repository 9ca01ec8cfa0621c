"""The demo's evidence machinery: scores that a model knowing nothing cannot pass, selection
that never reads the test split, the negative control, and the statistics."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loretta.demo import scoring
from loretta.demo.svl_data import MODALITIES, build_svl_digits, svl_config
from loretta.model import Decoder
from loretta.model.config import DecoderConfig
from loretta.stats import chance_band, fmt_mean_std, mean_std, paired_bootstrap

# a validation split of 200 items
SVL = {
    "pairs_per_class": 30,
    "test_per_class": 6,
    "val_per_class": 20,
    "text_vocab_size": 300,
    "image_side": 7,
    "image_levels": 4,
    "speech_frames": 8,
    "speech_coeffs": 6,
    "speech_levels": 8,
    "text_languages": ["en", "de"],
    "text_kinds": ["words", "frames"],
}


@pytest.fixture(scope="module")
def svl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("svl") / "svl"
    return dict(build_svl_digits(out, svl_config("tiny", SVL), workers=2).datasets)


def untrained(layout: object, seed: int) -> Decoder:
    """A model at its training initialisation: it knows nothing of the classes."""
    torch.manual_seed(seed)
    size = 64 * -(-layout.size // 64)  # type: ignore[attr-defined]
    cfg = DecoderConfig(vocab_size=size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    return Decoder(cfg).eval()


def test_untrained_models_score_chance_on_every_zero_shot_score(svl: dict[str, Path]) -> None:
    """Expected accuracy over untrained models is chance on every missing-pair score.

    One random model's score is not a sample of n independent items: its queries of one class
    share their structure, so a random function of (query, gallery) agrees with the classes on
    about 10 class pairs, and one model's accuracy spreads by about 0.3 / sqrt(10) ~ 0.1 around
    chance. The mean over K models spreads by ~0.1 / sqrt(K); a biased score shifts the mean."""
    from loretta.data.sources import open_dataset

    layout = open_dataset(str(svl["val"])).layout
    ev = scoring.load_eval_data(svl, "val", 2)
    scores: dict[str, list[float]] = {}
    K = 12
    for seed in range(K):
        model = untrained(layout, seed)
        res = scoring.evaluate_model(
            model, layout, svl, ev, 10, dict.fromkeys(MODALITIES, (1.0, 0)), only_missing=True
        )
        for a, b in scoring.MISSING:
            for kind in ("retrieval", "generation"):
                k = f"{kind}/{a}->{b}"
                scores.setdefault(k, []).append(res["acc"][k])
    half = 2.2 * 0.3 / np.sqrt(10 * K)  # ~2.2 standard deviations of the mean over K models
    for k, v in scores.items():
        assert abs(float(np.mean(v)) - 0.1) <= half, (k, np.round(v, 3).tolist(), half)


def test_retrieval_finds_a_planted_link_and_excludes_own_items() -> None:
    from loretta import eval as E

    # a model is not needed to test the centring: feed conditional log-likelihoods directly
    rng = np.random.default_rng(0)
    n, labels = 200, np.repeat(np.arange(10), 20)
    gallery = np.arange(0, 200, 4)
    lp = rng.normal(size=(n, len(gallery)))
    lp += 3.0 * rng.normal(size=(1, len(gallery)))  # item priors: plain likelihood is biased
    lp += 0.8 * (labels[:, None] == labels[gallery][None, :])  # a real but weak link
    orig = E.conditional_logprob
    try:
        E.conditional_logprob = lambda *a, **k: lp.copy()  # type: ignore[assignment]
        exclude = [int(np.flatnonzero(gallery == i)[0]) if i in gallery else -1 for i in range(n)]
        _, correct = E.retrieval(
            None, None, [None] * n, labels, [None] * len(gallery), labels[gallery], exclude
        )  # type: ignore[arg-type]
        assert correct.mean() > 0.5
        lp[:] = rng.normal(size=lp.shape) + 3.0 * rng.normal(size=(1, len(gallery)))
        _, correct = E.retrieval(
            None, None, [None] * n, labels, [None] * len(gallery), labels[gallery], exclude
        )  # type: ignore[arg-type]
        assert abs(correct.mean() - 0.1) < 0.1
    finally:
        E.conditional_logprob = orig  # type: ignore[assignment]


def test_selection_on_validation_never_reads_test(svl: dict[str, Path], tmp_path: Path) -> None:
    """Evaluation on val works with the test split gone: nothing on that path opens it."""
    from loretta.data.sources import open_dataset

    data = {k: tmp_path / k for k in svl}
    for k, v in svl.items():
        if k != "test":
            shutil.copytree(v, data[k])
    layout = open_dataset(str(data["val"])).layout
    ev = scoring.load_eval_data(data, "val", 2)
    res = scoring.evaluate_model(
        untrained(layout, 0), layout, data, ev, 10, dict.fromkeys(MODALITIES, (1.0, 1))
    )
    assert set(res["items"]) == {
        f"{k}/{a}->{b}" for k in ("retrieval", "generation") for a, b in scoring.MISSING
    }
    assert all(len(v) == len(ev.labels) for v in res["items"].values())  # every item scored
    with pytest.raises(Exception, match="test"):
        scoring.load_eval_data(data, "test", 2)


def control_documents(tmp_path: Path, mode: str, label_key: str = "label") -> list[Any]:
    """(dataset, sample, donors) of every generated block of 8 rows of tiny_loretta written under
    control `mode`, donors being the samples whose prompt modality equals the block's prompt;
    checks the real targets and the documents' tokens equal a plain run's."""
    from loretta.config import load_config
    from loretta.data.loader import RowWriter, global_stream, open_sources
    from loretta.transitive import build

    over = [
        f"--data.sources.0.path=synthetic:{tmp_path / 'ab'}",
        f"--data.sources.1.path=synthetic:{tmp_path / 'bc'}",
        "--objective.transitive_prob=1.0",
        f"--objective.control={mode}",
    ]
    cfg = load_config("tiny_loretta", over)
    datasets, layout = open_sources(cfg.data, cfg.run.seed)
    obj = build(cfg, layout)
    stream, builder = global_stream(cfg, datasets, layout, 1, obj.planner_factory())
    writer = RowWriter(datasets, builder, "raise", (mode, label_key, cfg.run.seed))
    plain = RowWriter(datasets, builder, "raise")
    rows = [stream.next_row() for _ in range(8)]
    ctl, ref = writer.write(rows), plain.write(rows)
    assert ctl["gen_docs"], "tiny_loretta with transitive_prob=1 plans generated blocks"
    out = []
    for (_, _, _, plan, arrays), (*_, own) in zip(ctl["gen_docs"], ref["gen_docs"]):
        ds = datasets[plan.source]
        for b in plan.blocks:
            if b.gen_from < 0:
                assert np.array_equal(arrays[b.modality], own[b.modality])  # the real target
                continue
            prompt = arrays[b.gen_from]
            name = layout.names[b.gen_from]
            donors = [
                j
                for j in range(len(ds))
                if ds.lengths[j][b.gen_from] == len(prompt)
                and np.array_equal(ds.read(j, [name])[name], prompt)
            ]
            assert donors
            out.append((ds, plan.sample, donors))
    # same documents and token layout as the plain run: only the prompts differ
    assert np.array_equal(ctl["tokens"], ref["tokens"])
    return out


def test_negative_control_prompts_come_from_another_class(tmp_path: Path) -> None:
    for ds, sample, donors in control_documents(tmp_path, "other_class"):
        label = ds.meta(sample)["label"]
        assert all(ds.meta(j)["label"] != label for j in donors)


def test_any_sample_control_takes_prompts_from_any_class(tmp_path: Path) -> None:
    # needs no labels: a key that no sample has is never read
    docs = control_documents(tmp_path, "any_sample", label_key="no_such_key")
    # of any class: about one prompt in 10 classes comes from the document's own class (3 of
    # the 32 here), where 'other_class' never takes one
    same = [any(ds.meta(j)["label"] == ds.meta(s)["label"] for j in d) for ds, s, d in docs]
    assert any(same) and not all(same)


def test_statistics() -> None:
    assert mean_std([0.2]) == (0.2, None)
    assert fmt_mean_std([0.2]) == "0.200 (1 seed)"
    m, s = mean_std([0.1, 0.3])
    assert m == pytest.approx(0.2) and s == pytest.approx(np.std([0.1, 0.3], ddof=1))
    lo, hi = chance_band(200)
    assert lo == pytest.approx(0.1 - 2 * np.sqrt(0.09 / 200))
    rng = np.random.default_rng(1)
    a = [(rng.random(300) < 0.3).astype(float) for _ in range(3)]
    b = [(rng.random(300) < 0.1).astype(float) for _ in range(3)]
    d, lo, hi = paired_bootstrap(a, b, n_boot=500)
    assert lo > 0 and lo < d < hi
    d, lo, hi = paired_bootstrap(a, a, n_boot=200)
    assert d == lo == hi == 0
    same = [(rng.random(300) < 0.1).astype(float) for _ in range(3)]
    _, lo, hi = paired_bootstrap(b, same, n_boot=500)
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([np.zeros(3)], [np.zeros(4)])


def test_headline_separates_linking_from_a_control_that_gains_too() -> None:
    """A control that gains as much as LoReTTa over commutative: LoReTTa - commutative is > 0,
    but LoReTTa - control covers 0 and the control is flagged outside the chance band."""
    from loretta.demo.report import headline, summarise

    rng = np.random.default_rng(3)
    n = 500
    keys = [f"{kind}/{a}->{b}" for kind in ("retrieval", "generation") for a, b in scoring.MISSING]

    def runs(p: float) -> list[dict[str, Any]]:
        out = []
        for _ in range(3):
            items = {k: (rng.random(n) < p).astype(float).tolist() for k in keys}
            out.append({"items": items, "acc": {k: float(np.mean(v)) for k, v in items.items()}})
        return out

    per_seed = {"commutative": runs(0.06), "loretta": runs(0.2), "control": runs(0.2)}
    h = headline(
        {
            "summary": summarise(per_seed, [1, 2, 3], n),
            "meta": {"split": "test", "seeds": [1, 2, 3]},
        }
    )
    for a, b in scoring.MISSING:
        d = h[f"{a}_to_{b}"]
        assert d["diff_ci95_low"] > 0  # the comparison with commutative alone would say "links"
        assert d["vs_control_ci95_low"] < 0 < d["vs_control_ci95_high"]
        assert d["control_in_band"] is False and d["control_acc"] > h["chance_band"][1]
    per_seed["control"] = runs(0.1)
    h = headline(
        {
            "summary": summarise(per_seed, [1, 2, 3], n),
            "meta": {"split": "test", "seeds": [1, 2, 3]},
        }
    )
    for a, b in scoring.MISSING:
        d = h[f"{a}_to_{b}"]
        assert d["vs_control_ci95_low"] > 0 and d["control_in_band"] is True


def test_every_demo_method_is_a_valid_config() -> None:
    """Each method's overrides resolve on every preset's recipe, and a control differs from its
    LoReTTa only in where pseudo-modalities are generated from (same documents, same compute)."""
    from loretta.config import load_config
    from loretta.configlib import to_dict
    from loretta.demo.methods import METHODS
    from loretta.demo.pipeline import PRESETS

    for preset in PRESETS.values():
        for name, method in METHODS.items():
            cfg = load_config(preset.recipe, [*preset.overrides, *method.overrides])
            if name.startswith("control"):
                # control_any: the shipped LoReTTa's with prompts from any sample
                any_sample = name == "control_any"
                twin = METHODS["loretta" + ("" if any_sample else name.removeprefix("control"))]
                same = load_config(preset.recipe, [*preset.overrides, *twin.overrides])
                assert cfg.objective.control == ("any_sample" if any_sample else "other_class")
                got, want = to_dict(cfg), to_dict(same)
                for d in (got, want):
                    d["objective"].pop("control")
                assert got == want, name
    # the fifth round: `loretta` (and so its control and faithful variant) gates the image link;
    # the earlier rounds' methods reproduce the ungated link they were run with
    gates = {
        name: [lk.gate for lk in load_config("svl_digits", list(m.overrides)).objective.links]
        for name, m in METHODS.items()
    }
    gated = ("loretta", "control", "control_any", "loretta_faithful", "loretta_gate02")
    for name in (*gated, "loretta_log", "control_log"):
        assert gates[name] == [None, 0.2], name
    # the sixth round's candidate differs from the shipped recipe in the loss alone
    log = to_dict(load_config("svl_digits", list(METHODS["loretta_log"].overrides)))
    shipped = to_dict(load_config("svl_digits", list(METHODS["loretta"].overrides)))
    assert log["objective"].pop("loss_on_generated") and not shipped["objective"].pop(
        "loss_on_generated"
    )
    assert log == shipped
    for name in ("loretta_ungated", "control_ungated", "loretta_image_t1", "loretta_p25"):
        assert gates[name] == [None, None], name
