"""Scoring one checkpoint on one evaluation split of SVL-digits (val for choices, test for the
report): zero-shot retrieval in both directions of the missing pair against held-out gallery
items, by-generation scoring with the method's decoding, the generator's class information,
and linear probes beside raw-input probes. Nothing here reads a split it was not given, except
the training splits for the classifiers of real samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEEN = [("image", "text"), ("text", "image"), ("text", "speech"), ("speech", "text")]
MISSING = [("image", "speech"), ("speech", "image")]
GENERATOR = [("text", "image"), ("text", "speech")]  # what transitive documents are built from
TRAIN_SPLIT = {"image": "vl", "text": "vl", "speech": "ls"}  # real samples for classifiers


def balanced(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


@dataclass
class EvalData:
    """One evaluation split, read once: items with labels, the gallery, raw-input probes."""

    split: str
    items: list[dict[str, np.ndarray]]
    labels: np.ndarray
    gallery: np.ndarray  # indices into items
    probe_fit: tuple[list[dict[str, np.ndarray]], np.ndarray]  # the split probes are fit on


def load_eval_data(data: dict[str, Path], split: str, gallery_per_class: int) -> EvalData:
    """Reads `split` (and, for probes, the split they are fit on), nothing else held out."""
    from loretta.eval import labelled

    items, y = labelled(str(data[split]), ["image", "speech", "text"])
    gallery = balanced(y, gallery_per_class, seed=1)
    # probes are fit on validation and scored on the split (on val itself: fit on half of it)
    if split == "test":
        fit = labelled(str(data["val"]), ["image", "speech", "text"])
    else:
        half = balanced(y, max(1, int(np.bincount(y).min()) // 2), seed=3)
        fit = ([items[i] for i in half], y[half])
    return EvalData(split, items, y, gallery, fit)


def raw_probes(ev: EvalData, layout: Any) -> dict[str, float]:
    """Probes on the input tokens themselves: what a model probe must beat to mean anything."""
    from loretta.eval import linear_probe, token_features

    out = {}
    fit, y_fit = ev.probe_fit
    for name, mods in (
        ("raw[image+speech]", ("image", "speech")),
        ("raw[image]", ("image",)),
        ("raw[speech]", ("speech",)),
    ):

        def feats(xs: list[dict[str, np.ndarray]], mods: tuple[str, ...] = mods) -> np.ndarray:
            return np.concatenate(
                [token_features(layout, m, [x[m] for x in xs]) for m in mods], axis=1
            )

        out[name] = linear_probe(feats(fit), y_fit, feats(ev.items), ev.labels)
    return out


def evaluate(
    ckpt: Path,
    data: dict[str, Path],
    ev: EvalData,
    seen_items: int,
    decoding: dict[str, tuple[float, int]],
) -> dict[str, Any]:
    from loretta.checkpoint.load import load_model

    model, layout = load_model(ckpt)
    return evaluate_model(model, layout, data, ev, seen_items, decoding)


def evaluate_model(
    model: Any,
    layout: Any,
    data: dict[str, Path],
    ev: EvalData,
    seen_items: int,
    decoding: dict[str, tuple[float, int]],
    only_missing: bool = False,
) -> dict[str, Any]:
    """Every score of one model on one split (ev), plus classifiers fit on training splits.
    decoding: modality -> (temperature, top_k) its samples are drawn with (the method's own).
    only_missing: just the missing pair's retrieval and by-generation scores."""
    from loretta.eval import (
        fit_linear,
        generate_modality,
        labelled,
        linear_probe,
        pooled_features,
        retrieval,
        token_features,
    )

    res: dict[str, Any] = {"acc": {}, "items": {}}
    y, items = ev.labels, ev.items
    g_items = [items[j] for j in ev.gallery]
    g_labels = y[ev.gallery]
    own = {int(j): k for k, j in enumerate(ev.gallery)}
    seen_q = balanced(y, max(1, seen_items // 10), seed=2)
    for src, dst in MISSING + ([] if only_missing else SEEN):
        q = np.arange(len(items)) if (src, dst) in MISSING else seen_q
        exclude = [own.get(int(i), -1) for i in q]
        _, correct = retrieval(
            model,
            layout,
            [(src, items[i][src]) for i in q],
            y[q],
            [(dst, g[dst]) for g in g_items],
            g_labels,
            exclude,
        )
        res["acc"][f"retrieval/{src}->{dst}"] = float(correct.mean())
        if (src, dst) in MISSING:
            res["items"][f"retrieval/{src}->{dst}"] = correct.astype(int).tolist()
    # by generation: sample dst with the method's decoding, label it with a classifier of real
    # training samples of dst; the generator pairs say what the transitive documents carry
    classifiers: dict[str, Any] = {}
    for src, dst in MISSING + ([] if only_missing else GENERATOR):
        temperature, top_k = decoding[dst]
        if dst not in classifiers:
            real, labels = labelled(str(data[TRAIN_SPLIT[dst]]), [dst], limit=2000)
            classifiers[dst] = fit_linear(
                token_features(layout, dst, [r[dst] for r in real]), labels
            )
        clf = classifiers[dst]
        gen = generate_modality(
            model,
            layout,
            [(src, s[src]) for s in items],
            dst,
            seed=0,
            temperature=temperature,
            top_k=top_k or None,
            max_tokens=24,
        )
        correct = (clf(token_features(layout, dst, gen)) == y).astype(int)
        res["acc"][f"generation/{src}->{dst}"] = float(correct.mean())
        if (src, dst) in MISSING:
            res["items"][f"generation/{src}->{dst}"] = correct.tolist()
    if only_missing:
        return res
    fit, y_fit = ev.probe_fit
    docs = [[("image", s["image"]), ("speech", s["speech"])] for s in fit]
    f_fit = pooled_features(model, layout, docs)
    f_ev = pooled_features(
        model, layout, [[("image", s["image"]), ("speech", s["speech"])] for s in items]
    )
    res["acc"]["probe/model[image+speech]"] = linear_probe(f_fit, y_fit, f_ev, y)
    return res
