"""The built-in default job: SVL-digits pretraining that tests whether transitive training links
the pair that is never seen together.

    loretta-demo [--preset cpu] [--methods commutative,loretta,control] [--seeds 2000]
                 [--split test] [--out runs/svl-demo]

1. builds SVL-digits (cached): (vision, language) and (language, speech) training pairs, the
   (vision, speech) pairs used only by the ceiling, and aligned validation and test triples;
2. trains each method with ZeRO-3 on this machine (2 CPU processes, or every GPU) on identical
   model and token budget. Methods whose data streams agree until transitive documents start
   (commutative, LoReTTa, the negative control) branch from one commutative checkpoint at that
   step, a paired comparison at less compute;
3. evaluates one split (`--split val` for choices, `test` for the final report; nothing else is
   read): zero-shot retrieval in both directions of the missing pair against held-out items of
   that split, by-generation scoring with each method's own decoding, how much class information
   the generator's pseudo-modalities carry, linear probes beside raw-input probes;
4. writes a report folder: summary.md (per-seed values, mean ± sample std, paired bootstrap
   interval of LoReTTa - commutative), metrics.json with every item's outcome, plots.

Methods: gpt (one fixed direction), commutative, loretta (the recipe's decoding, selected on
validation), loretta_faithful (the authors' pseudocode: sampling at temperature 1), the decoding
candidates loretta_greedy / loretta_t05, control (pseudo-modalities generated from a sample of
another class) and ceiling (trained with real image-speech pairs too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loretta.configlib import to_dict
from loretta.data.format import replace_dir
from loretta.stats import chance_band, fmt_mean_std, mean_std, paired_bootstrap

SEEN = [("image", "text"), ("text", "image"), ("text", "speech"), ("speech", "text")]
MISSING = [("image", "speech"), ("speech", "image")]
GENERATOR = [("text", "image"), ("text", "speech")]  # what transitive documents are built from
TRAIN_SPLIT = {"image": "vl", "text": "vl", "speech": "ls"}  # real samples for classifiers
FIXED_ORDER = "--data.sequence.fixed_order=[image,text,speech]"


@dataclass(frozen=True)
class Method:
    overrides: tuple[str, ...] = ()
    branch: bool = False  # starts from the commutative run's checkpoint at the transitive start
    ceiling: bool = False  # trains on the (vision, speech) pairs too
    decoding: tuple[float, int] | None = None  # (temperature, top_k); None: the recipe's


METHODS: dict[str, Method] = {
    "gpt": Method(("--data.sequence.order=fixed", FIXED_ORDER, "--objective.links=[]")),
    "commutative": Method(("--objective.links=[]",)),
    "loretta": Method(branch=True),
    "loretta_faithful": Method(
        ("--objective.generation.temperature=1.0", "--objective.generation.top_k=0"),
        branch=True,
        decoding=(1.0, 0),
    ),
    "loretta_greedy": Method(
        ("--objective.generation.temperature=1.0", "--objective.generation.top_k=1"),
        branch=True,
        decoding=(1.0, 1),
    ),
    "loretta_t05": Method(
        ("--objective.generation.temperature=0.5", "--objective.generation.top_k=0"),
        branch=True,
        decoding=(0.5, 0),
    ),
    "control": Method(("--objective.control=other_class",), branch=True),
    "ceiling": Method(("--objective.links=[]",), ceiling=True),
}
TRUNK = "commutative"


@dataclass
class Preset:
    data_preset: str
    data: dict[str, Any]
    recipe: str
    steps: int
    gallery_per_class: int  # held-out items per class that queries are scored against
    seen_items: int  # queries for the seen pairs (context only; the missing pair uses all)
    methods: list[str]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)


CPU_DATA = {
    # small enough for a couple of thousand steps on two CPU cores to learn the seen pairs:
    # 7x7 images with 4 levels, 8x6 MFCC speech, number words and simple phrases
    "image_side": 7,
    "image_levels": 4,
    "speech_frames": 8,
    "speech_coeffs": 6,
    "speech_levels": 8,
    "text_languages": ["en", "de", "fr", "es", "it"],
    "text_kinds": ["words", "frames"],
    "missing_pair": True,
}
PRESETS = {
    # README's first command: one fresh seed, the essential methods, about 12 minutes on 2 cores
    "cpu": Preset(
        "default",
        CPU_DATA,
        "svl_digits",
        steps=2000,
        gallery_per_class=5,
        seen_items=100,
        methods=["commutative", "loretta", "control"],
        seeds=[2000],
    ),
    # bench/demo.py: every control on fresh seeds (up to an hour on 2 cores)
    "bench": Preset(
        "default",
        CPU_DATA,
        "svl_digits",
        steps=2000,
        gallery_per_class=5,
        seen_items=100,
        methods=["commutative", "loretta", "loretta_faithful", "control", "ceiling"],
        seeds=[1000, 1001, 1002],
    ),
    # seconds: for tests
    "smoke": Preset(
        "tiny",
        {
            "speech_frames": 6,
            "speech_coeffs": 4,
            "speech_levels": 8,
            "image_levels": 8,
            "image_side": 7,
            "missing_pair": True,
        },
        "svl_digits",
        steps=6,
        gallery_per_class=2,
        seen_items=10,
        methods=["gpt", "commutative", "loretta", "control", "ceiling"],
        seeds=[0],
        overrides=[
            "--data.seq_len=128",
            "--optim.warmup_steps=2",
            "--logging.interval=2",
        ],
    ),
    # the paper's data sizes and tokenisation with a larger model: for a GPU, every method
    "gpu": Preset(
        "default",
        {**CPU_DATA, "image_side": 14, "image_levels": 16, "speech_levels": 16},
        "svl_digits_large",
        steps=6000,
        gallery_per_class=10,
        seen_items=200,
        methods=["gpt", "commutative", "loretta", "loretta_faithful", "control", "ceiling"],
        seeds=[1000, 1001, 1002],
    ),
}


def data_dir_for(root: Path, preset: Preset) -> Path:
    from loretta.demo.svl_data import fingerprint, svl_config

    cfg = svl_config(preset.data_preset, preset.data)
    return root / f"{preset.data_preset}-{fingerprint(cfg)[:8]}"


def _sources(data: dict[str, Path], ceiling: bool) -> str:
    srcs = [
        f"{{name: vl, path: '{data['vl']}', weight: 1.0, modalities: [image, text]}}",
        f"{{name: ls, path: '{data['ls']}', weight: 1.0, modalities: [text, speech]}}",
    ]
    if ceiling:
        srcs.append(f"{{name: vs, path: '{data['vs']}', weight: 1.0, modalities: [image, speech]}}")
    return "--data.sources=[" + ", ".join(srcs) + "]"


def branch_step(preset: Preset, steps: int, extra: list[str]) -> int:
    """The step at which transitive documents start (the trunk's checkpoint the branches use)."""
    from loretta.config import load_config

    cfg = load_config(preset.recipe, [*preset.overrides, f"--run.steps={steps}", *extra])
    return int(cfg.objective.transitive_start * steps)


def train(
    method: str,
    seed: int,
    out: Path,
    data: dict[str, Path],
    preset: Preset,
    steps: int,
    nproc: int,
    extra: list[str],
) -> Path:
    """Train (or find already trained) one method and seed; returns its checkpoints folder."""
    from loretta.launch import torchrun_pretrain
    from loretta.train.checkpoint import latest_complete, read_state, step_dir

    spec = METHODS[method]
    run_dir = out / f"{method}-seed{seed}"
    ckpts = run_dir / "checkpoints"
    done = latest_complete(ckpts)
    if done is not None and read_state(done).get("step") == steps:
        print(f"[loretta-demo] {method} seed {seed}: already trained ({done})", flush=True)
        return ckpts
    start = branch_step(preset, steps, extra)
    over = [
        f"--run.run_dir={run_dir}",
        f"--run.name={method}-seed{seed}",
        f"--run.seed={seed}",
        f"--run.steps={steps}",
        _sources(data, spec.ceiling),
        "--checkpoint.keep_last=2",
        *preset.overrides,
        *spec.overrides,
        *extra,
    ]
    if method == TRUNK and 0 < start < steps:
        over.append(f"--checkpoint.interval={start}")  # the branches start from this one
    if spec.branch and 0 < start < steps and done is None:
        trunk = out / f"{TRUNK}-seed{seed}" / "checkpoints"
        over += [f"--checkpoint.resume={step_dir(trunk, start)}"]
    else:
        over += ["--checkpoint.resume=auto"]
    print(f"[loretta-demo] training {method} (seed {seed}, {steps} steps)", flush=True)
    code = torchrun_pretrain(preset.recipe, over, nproc)
    if code != 0:
        raise RuntimeError(f"training {method} seed {seed} failed (exit {code}); see {run_dir}")
    return ckpts


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


def load_eval_data(data: dict[str, Path], split: str, preset: Preset) -> EvalData:
    """Reads `split` (and, for probes, the split they are fit on), nothing else held out."""
    from loretta.eval import labelled

    items, y = labelled(str(data[split]), ["image", "speech", "text"])
    gallery = balanced(y, preset.gallery_per_class, seed=1)
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
    ckpt: Path, data: dict[str, Path], ev: EvalData, preset: Preset, decoding: tuple[float, int]
) -> dict[str, Any]:
    from loretta.convert import load_model

    model, layout = load_model(ckpt)
    return evaluate_model(model, layout, data, ev, preset.seen_items, decoding)


def evaluate_model(
    model: Any,
    layout: Any,
    data: dict[str, Path],
    ev: EvalData,
    seen_items: int,
    decoding: tuple[float, int],
) -> dict[str, Any]:
    """Every score of one model on one split (ev), plus classifiers fit on training splits."""
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
    for src, dst in MISSING + SEEN:
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
    temperature, top_k = decoding
    classifiers: dict[str, Any] = {}
    for src, dst in MISSING + GENERATOR:
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
    fit, y_fit = ev.probe_fit
    docs = [[("image", s["image"]), ("speech", s["speech"])] for s in fit]
    f_fit = pooled_features(model, layout, docs)
    f_ev = pooled_features(
        model, layout, [[("image", s["image"]), ("speech", s["speech"])] for s in items]
    )
    res["acc"]["probe/model[image+speech]"] = linear_probe(f_fit, y_fit, f_ev, y)
    return res


def method_decoding(method: str, preset: Preset, extra: list[str]) -> tuple[float, int]:
    spec = METHODS[method]
    if spec.decoding is not None:
        return spec.decoding
    from loretta.config import load_config

    g = load_config(preset.recipe, [*preset.overrides, *extra]).objective.generation
    return (g.temperature, g.top_k)


# ---- summary ------------------------------------------------------------------------------------
def summarise(
    per_seed: dict[str, list[dict[str, Any]]], seeds: list[int], n_items: int
) -> dict[str, Any]:
    """Per-method means and sample stds, per-seed values, paired intervals vs commutative."""
    out: dict[str, Any] = {"methods": {}, "diff": {}, "chance": 0.1}
    out["chance_band"] = list(chance_band(n_items))
    for m, runs in per_seed.items():
        keys = runs[0]["acc"].keys()
        out["methods"][m] = {
            k: {
                "per_seed": [r["acc"][k] for r in runs],
                "mean": mean_std([r["acc"][k] for r in runs])[0],
                "std": mean_std([r["acc"][k] for r in runs])[1],
            }
            for k in keys
        }
    if TRUNK in per_seed:
        for m in per_seed:
            if m == TRUNK:
                continue
            for key in per_seed[m][0]["items"]:
                a = [np.asarray(r["items"][key]) for r in per_seed[m]]
                b = [np.asarray(r["items"][key]) for r in per_seed[TRUNK]]
                d, lo, hi = paired_bootstrap(a, b, seed=0)
                out["diff"].setdefault(m, {})[key] = {"mean": d, "ci95": [lo, hi]}
    return out


def direction_key(src: str, dst: str) -> str:
    return f"{src}_to_{dst}"


def write_report(report: Path, s: dict[str, Any], meta: dict[str, Any]) -> None:
    methods = list(s["methods"])
    seeds = meta["seeds"]
    lo, hi = s["chance_band"]

    def cell(m: str, k: str) -> str:
        if k not in s["methods"][m]:
            return "–"
        return fmt_mean_std(s["methods"][m][k]["per_seed"])

    def table(keys: list[tuple[str, str]]) -> list[str]:
        rows = ["| | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        rows += [
            f"| {title} | " + " | ".join(cell(m, k) for m in methods) + " |" for k, title in keys
        ]
        return rows

    lines = [
        "# LoReTTa on SVL-digits",
        "",
        f"Split: **{meta['split']}** ({meta['n_items']} aligned triples, every item scored); "
        f"seeds {seeds} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}); {meta['steps']} "
        f"steps per method; mean ± sample std over seeds. Trained on (vision, language) and "
        "(language, speech) pairs; vision-speech is the missing pair (only `ceiling` sees it). "
        f"Chance 0.100, chance band for {meta['n_items']} items [{lo:.3f}, {hi:.3f}].",
        "",
        "## The missing pair",
        "",
        "Zero-shot retrieval: each query is labelled with the class whose held-out gallery items "
        f"({meta['gallery_per_class']} per class from the same split, the query's own item "
        "excluded) are most likely given it, each gallery item's log-likelihood centred over all "
        "queries (a model that knows nothing scores chance).",
        "",
        *table([(f"retrieval/{a}->{b}", f"{a} → {b}") for a, b in MISSING]),
        "",
        "By generation: the target modality sampled from the input with the method's own decoding, "
        "labelled by a linear classifier of real training samples.",
        "",
        *table([(f"generation/{a}->{b}", f"{a} → {b}") for a, b in MISSING]),
        "",
    ]
    if s["diff"]:
        lines += [
            "Paired difference to `commutative` (same seeds, same items), 95% bootstrap interval "
            "over seeds × items:",
            "",
            "| method | score | difference | 95% CI |",
            "|---|---|---|---|",
        ]
        for m, by in s["diff"].items():
            for k, v in by.items():
                verdict = " **> 0**" if v["ci95"][0] > 0 else ""
                lines.append(
                    f"| {m} | {k} | {v['mean']:+.3f} | [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                    f"{verdict} |"
                )
        lines.append("")
    lines += [
        "## What the transitive documents are built from",
        "",
        "Class information in the generator's pseudo-modalities (text → image, text → speech by "
        "generation, classified as above): LoReTTa's `[<speech> S' <image> I]` documents can only "
        "teach images from speech if S' carries the class, and likewise for I'.",
        "",
        *table([(f"generation/{a}->{b}", f"{a} → {b}") for a, b in GENERATOR]),
        "",
        f"## Seen pairs (context; {meta['seen_items']} queries)",
        "",
        *table([(f"retrieval/{a}->{b}", f"{a} → {b}") for a, b in SEEN]),
        "",
        "## Linear probes",
        "",
        "Logistic regression fit on "
        + ("the validation split" if meta["split"] == "test" else "half of the split")
        + ", scored on this split. A model probe below the raw-input probe says nothing about the "
        "model.",
        "",
        *table([("probe/model[image+speech]", "model, [image, speech] documents")]),
        "",
        "| raw input tokens | accuracy |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in meta["raw_probes"].items()],
        "",
        "## Per seed",
        "",
    ]
    for m in methods:
        for k in [f"retrieval/{a}->{b}" for a, b in MISSING]:
            vals = ", ".join(f"{v:.3f}" for v in s["methods"][m][k]["per_seed"])
            lines.append(f"- {m}, {k}: {vals}")
    lines += [
        "",
        "![accuracy](accuracy.png)",
        "",
        "![loss per direction](loss_per_direction.png)",
        "",
        f"Wall time {meta['wall_s']:.0f} s on {meta['device']}. Data: {meta['data']}. "
        f"Pseudo-modality decoding per method: {meta['decoding']}.",
    ]
    (report / "summary.md").write_text("\n".join(lines) + "\n")


def loss_plot(runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(runs), figsize=(4.2 * len(runs), 3.2), sharey=True, squeeze=False
    )
    for ax, (method, run) in zip(axes[0], runs.items()):
        rows = []
        for f in (
            run / "metrics.jsonl",
            run.parent / f"{TRUNK}-{run.name.split('-')[-1]}" / "metrics.jsonl",
        ):
            if f.exists():
                rows += [json.loads(x) for x in f.read_text().splitlines()]
        # a resumed run logs the steps after its checkpoint again: keep each step's last record
        by_step: dict[int, dict[str, Any]] = {}
        for r in rows:
            if "loss" in r and "event" not in r:
                by_step.setdefault(r["step"], r)
        rows = [by_step[s] for s in sorted(by_step)]
        keys = sorted({k for r in rows for k in r if k.startswith("loss/dir/") and "->" in k})
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot(*zip(*pts), label=k.removeprefix("loss/dir/"), lw=1)
        ax.set_title(method)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("loss per direction (nats/token)")
    for ax in axes[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def accuracy_plot(s: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"retrieval/{a}->{b}" for a, b in MISSING] + [
        f"generation/{a}->{b}" for a, b in MISSING
    ]
    methods = list(s["methods"])
    x = np.arange(len(keys))
    w = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for i, m in enumerate(methods):
        mean = [s["methods"][m][k]["mean"] for k in keys]
        std = [s["methods"][m][k]["std"] or 0.0 for k in keys]
        ax.bar(x + i * w, mean, w, yerr=std, label=m, capsize=2)
    lo, hi = s["chance_band"]
    ax.axhspan(lo, hi, color="gray", alpha=0.2, label="chance band")
    ax.set_xticks(x + w * (len(methods) - 1) / 2)
    ax.set_xticklabels([k.replace("/", "\n") for k in keys], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title("the missing pair (never seen together in training)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(
    out: Path,
    preset_name: str,
    methods: list[str],
    seeds: list[int],
    steps: int | None,
    nproc: int,
    data_root: Path,
    extra: list[str],
    split: str = "test",
) -> dict[str, Any]:
    import torch

    from loretta.demo.svl_data import build_svl_digits, svl_config
    from loretta.launch import default_nproc

    t0 = time.time()
    preset = PRESETS[preset_name]
    steps = steps or preset.steps
    nproc = nproc or default_nproc()
    data_root = data_dir_for(data_root, preset)
    print(f"[loretta-demo] SVL-digits data in {data_root} (built once, then cached)", flush=True)
    paths = build_svl_digits(data_root, svl_config(preset.data_preset, preset.data))
    data = dict(paths.datasets)
    # branches need the trunk's checkpoint: train it first
    order = sorted(methods, key=lambda m: (m != TRUNK, m))
    needs_trunk = any(METHODS[m].branch for m in methods)
    if needs_trunk and TRUNK not in methods:
        order = [TRUNK, *order]
    ev = load_eval_data(data, split, preset)
    per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    runs: dict[str, Path] = {}
    decoding = {m: method_decoding(m, preset, extra) for m in methods}
    layout = None
    for seed in seeds:
        for m in order:
            ckpt = train(m, seed, out, data, preset, steps, nproc, extra)
            if m not in methods:
                continue
            print(f"[loretta-demo] evaluating {m} seed {seed} on {split}", flush=True)
            per_seed[m].append(evaluate(ckpt, data, ev, preset, decoding[m]))
            runs.setdefault(m, out / f"{m}-seed{seed}")
            if layout is None:
                from loretta.train.checkpoint import latest_complete, read_layout

                done = latest_complete(ckpt)
                assert done is not None
                layout = read_layout(done)
    summary = summarise(per_seed, seeds, len(ev.labels))
    report = out / ".report.tmp"
    shutil.rmtree(report, ignore_errors=True)
    report.mkdir(parents=True)
    loss_plot(runs, report / "loss_per_direction.png")
    accuracy_plot(summary, report / "accuracy.png")
    meta = {
        "preset": preset_name,
        "split": split,
        "steps": steps,
        "seeds": seeds,
        "methods": methods,
        "n_items": len(ev.labels),
        "gallery_per_class": preset.gallery_per_class,
        "seen_items": preset.seen_items,
        "raw_probes": raw_probes(ev, layout),
        "decoding": {m: {"temperature": d[0], "top_k": d[1]} for m, d in decoding.items()},
        "wall_s": time.time() - t0,
        "nproc": nproc,
        "data": str(data_root),
        "device": "GPU" if torch.cuda.is_available() else f"CPU x{nproc} processes",
        "preset_settings": to_dict(preset),
    }
    metrics = {
        "meta": meta,
        "summary": summary,
        "per_seed": {m: [dict(r, seed=s) for r, s in zip(v, seeds)] for m, v in per_seed.items()},
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_report(report, summary, meta)
    replace_dir(report, out / "report")
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures bench/demo.py prints: per missing direction and method, the mean accuracy;
    the paired interval of LoReTTa (selected) - commutative; control, ceiling, chance."""
    s = metrics["summary"]
    out: dict[str, Any] = {}
    for a, b in MISSING:
        key = f"retrieval/{a}->{b}"
        d: dict[str, Any] = {m: round(v[key]["mean"], 4) for m, v in s["methods"].items()}
        diff = s["diff"].get("loretta", {}).get(key)
        if diff is not None:
            d["diff"] = round(diff["mean"], 4)
            d["diff_ci95_low"], d["diff_ci95_high"] = (round(x, 4) for x in diff["ci95"])
        if "control" in s["methods"]:
            d["control_acc"] = d["control"]
        if "ceiling" in s["methods"]:
            d["ceiling_acc"] = d["ceiling"]
        gen = {m: round(v[f"generation/{a}->{b}"]["mean"], 4) for m, v in s["methods"].items()}
        d["by_generation"] = gen
        out[direction_key(a, b)] = d
    for k in ("control_acc", "ceiling_acc"):
        out[k] = {direction_key(a, b): out[direction_key(a, b)].get(k) for a, b in MISSING}
    out["chance"] = s["chance"]
    out["chance_band"] = [round(x, 4) for x in s["chance_band"]]
    out["selection_split"] = "val"
    out["split"] = metrics["meta"]["split"]
    out["seeds"] = metrics["meta"]["seeds"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="loretta-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--methods", default="", help="comma-separated; default: the preset's")
    ap.add_argument("--seeds", default="", help="comma-separated; default: the preset's")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--steps", type=int, default=0, help="0: the preset's")
    ap.add_argument("--out", default="runs/svl-demo")
    ap.add_argument("--data", default="data/svl-digits", help="where the dataset is cached")
    ap.add_argument("--nproc", type=int, default=0, help="0: 2 on a CPU, one per GPU")
    ap.add_argument(
        "--svl",
        action="append",
        default=[],
        help="SVL-digits data override, e.g. --svl image_side=14 (repeatable)",
    )
    a, extra = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    preset = PRESETS[a.preset]
    for item in a.svl:
        key, _, value = item.partition("=")
        import yaml

        preset.data[key] = yaml.safe_load(value)
    methods = [m for m in (a.methods or ",".join(preset.methods)).split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(
            f"loretta-demo: error: --methods: unknown {bad}; choose from {list(METHODS)}",
            file=sys.stderr,
        )
        return 2
    seeds = [int(s) for s in (a.seeds or ",".join(map(str, preset.seeds))).split(",")]
    metrics = run(
        Path(a.out),
        a.preset,
        methods,
        seeds,
        a.steps or None,
        a.nproc,
        Path(a.data),
        extra,
        a.split,
    )
    report = Path(a.out) / "report"
    print(f"\n[loretta-demo] report: {report / 'summary.md'}")
    h = headline(metrics)
    for a_, b_ in MISSING:
        d = h[direction_key(a_, b_)]
        line = ", ".join(f"{m} {d[m]:.3f}" for m in methods)
        ci = (
            f"; loretta - commutative {d['diff']:+.3f} [{d['diff_ci95_low']:+.3f}, "
            f"{d['diff_ci95_high']:+.3f}]"
            if "diff" in d
            else ""
        )
        print(f"[loretta-demo] {a_} -> {b_} (missing pair, {h['split']}): {line}{ci}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
