"""The built-in default job: SVL-digits pretraining that shows transitive linking at work.

    loretta-demo [--preset cpu] [--methods gpt,commutative,loretta] [--seeds 0] [--out runs/svl-demo]

1. builds SVL-digits (cached): (vision, language) and (language, speech) training pairs, and a
   test set aligned across all three; vision-speech is the missing pair;
2. trains each method with ZeRO-3 on this machine (2 CPU processes, or every GPU) on identical
   data and token budgets: GPT (one fixed direction), commutative, LoReTTa (commutative +
   transitive);
3. evaluates every pair in both directions by zero-shot classification (conditional likelihood
   of class prototypes) and a linear probe on pooled hidden states;
4. writes a report folder: summary.md, metrics.json, loss and accuracy plots, and a grid of
   images generated from speech (never paired with images in training) and from text.
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

METHODS: dict[str, list[str]] = {
    # one direction per pair: image -> text and text -> speech
    "gpt": [
        "--data.sequence.order=fixed",
        "--data.sequence.fixed_order=[image,text,speech]",
        "--objective.links=[]",
    ],
    "commutative": ["--objective.links=[]"],
    "loretta": [],
}
SEEN = [("image", "text"), ("text", "image"), ("text", "speech"), ("speech", "text")]
MISSING = [("image", "speech"), ("speech", "image")]
PROTO_SPLIT = {"image": "vl", "text": "vl", "speech": "ls"}
PROBES = [("image", "speech"), ("image", "text"), ("text", "speech")]
# The headline zero-shot score is the calibrated one (PMI: log p(proto | input) - log p(proto)).
# Plain conditional likelihood ranks classes by how probable their prototypes are a priori: it
# sits at chance on the *seen* text -> image pair for every method, so it cannot measure image
# targets; calibrated scoring does (e.g. commutative text -> image 0.46 at 2000 steps).
HEADLINE = "zeroshot_pmi"


@dataclass
class Preset:
    data_preset: str
    data: dict[str, Any]
    recipe: str
    steps: int
    eval_per_class: int  # test items per class scored
    prototypes: int  # prototypes per class
    overrides: list[str] = field(default_factory=list)


PRESETS = {
    # a few minutes per method on two CPU cores
    "cpu": Preset(
        "default",
        {
            # small enough for a few hundred steps on two CPU cores to learn the seen pairs:
            # 7x7 images with 4 levels, 8x6 MFCC speech, number words and simple phrases
            "image_side": 7,
            "image_levels": 4,
            "speech_frames": 8,
            "speech_coeffs": 6,
            "speech_levels": 8,
            "text_languages": ["en", "de", "fr", "es", "it"],
            "text_kinds": ["words", "frames"],
        },
        "svl_digits",
        steps=2000,
        eval_per_class=20,
        prototypes=4,
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
        },
        "svl_digits",
        steps=6,
        eval_per_class=2,
        prototypes=1,
        overrides=[
            "--data.seq_len=128",
            "--optim.warmup_steps=2",
            "--checkpoint.interval=0",
            "--logging.interval=2",
            "--objective.transitive_start=0",
        ],
    ),
    # the paper's data sizes and tokenisation with a larger model: for GPU machines
    "full": Preset("full", {}, "svl_digits_large", steps=20000, eval_per_class=384, prototypes=5),
}


def data_dir_for(root: Path, preset: Preset) -> Path:
    from loretta.demo.svl_data import fingerprint, svl_config

    return (
        root
        / f"{preset.data_preset}-{fingerprint(svl_config(preset.data_preset, preset.data))[:8]}"
    )


def train(
    method: str,
    seed: int,
    run_dir: Path,
    data: dict[str, Path],
    preset: Preset,
    steps: int,
    nproc: int,
    extra: list[str],
) -> Path:
    from loretta.launch import torchrun_pretrain
    from loretta.train.checkpoint import latest_complete, read_state

    ckpts = run_dir / "checkpoints"
    done = latest_complete(ckpts)
    if done is not None and read_state(done).get("step") == steps:
        print(f"[loretta-demo] {method} seed {seed}: already trained ({done})", flush=True)
        return ckpts
    over = [
        f"--run.run_dir={run_dir}",
        f"--run.name={method}-seed{seed}",
        f"--run.seed={seed}",
        f"--run.steps={steps}",
        f"--data.sources.0.path={data['vl']}",
        f"--data.sources.1.path={data['ls']}",
        "--resume",
        "auto",
        *preset.overrides,
        *METHODS[method],
        *extra,
    ]
    print(f"[loretta-demo] training {method} (seed {seed}, {steps} steps)", flush=True)
    code = torchrun_pretrain(preset.recipe, over, nproc)
    if code != 0:
        raise RuntimeError(f"training {method} seed {seed} failed (exit {code}); see {run_dir}")
    return ckpts


def balanced(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


def evaluate(ckpt: Path, data: dict[str, Path], preset: Preset) -> dict[str, float]:
    from loretta.checkpoint.load import load_model
    from loretta.eval import (
        fit_linear,
        generate_modality,
        labelled,
        linear_probe,
        pooled_features,
        prototypes_from,
        token_features,
        zero_shot,
    )

    model, layout = load_model(ckpt)
    test, y = labelled(str(data["test"]), ["image", "speech", "text"])
    keep = balanced(y, preset.eval_per_class)
    items, y_eval = [test[i] for i in keep], y[keep]
    res: dict[str, float] = {}
    classifiers = {}  # per target modality: a linear classifier on real training samples
    for dst in ("image", "speech", "text"):
        real, labels = labelled(str(data[PROTO_SPLIT[dst]]), [dst], limit=2000)
        classifiers[dst] = fit_linear(token_features(layout, dst, [r[dst] for r in real]), labels)
    for src, dst in SEEN + MISSING:
        protos = prototypes_from(str(data[PROTO_SPLIT[dst]]), dst, preset.prototypes)
        conds = [(src, s[src]) for s in items]
        for key, cal in (("zeroshot", False), ("zeroshot_pmi", True)):
            pred, _ = zero_shot(model, layout, conds, protos, calibrate=cal)
            res[f"{key}/{src}->{dst}"] = float((pred == y_eval).mean())
        # zero-shot by generation: sample dst from src, label the sample with the classifier
        gen = generate_modality(model, layout, conds, dst, seed=0, max_tokens=24)
        pred = classifiers[dst](token_features(layout, dst, gen))
        res[f"zeroshot_gen/{src}->{dst}"] = float((pred == y_eval).mean())
    half = len(y) // 2  # probe: fit on one half of the aligned test set, score the other
    order = np.random.default_rng(1).permutation(len(y))
    tr, te = order[:half], order[half:]
    for a, b in PROBES:
        feats = pooled_features(model, layout, [[(a, s[a]), (b, s[b])] for s in test])
        res[f"probe/{a}+{b}"] = linear_probe(feats[tr], y[tr], feats[te], y[te])
    for key, tag in ((HEADLINE, ""), ("zeroshot", "_plain"), ("zeroshot_gen", "_gen")):
        res[f"missing_pair{tag}"] = float(np.mean([res[f"{key}/{s}->{d}"] for s, d in MISSING]))
        res[f"seen_pairs{tag}"] = float(np.mean([res[f"{key}/{s}->{d}"] for s, d in SEEN]))
    return res


def generate_grid(
    ckpt: Path, data: dict[str, Path], svl_root: Path, out: Path, per_class: int = 2
) -> None:
    """PNG grid: for each class, images generated from speech (the missing pair) and from text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loretta.checkpoint.load import load_model
    from loretta.demo.svl_data import SvlDigits
    from loretta.eval import generate_modality, labelled

    model, layout = load_model(ckpt)
    svl = SvlDigits.load(svl_root)
    test, y = labelled(str(data["test"]), ["image", "speech", "text"])
    keep = balanced(y, per_class, seed=2)
    items, labels = [test[i] for i in keep], y[keep]
    gen = {
        src: generate_modality(model, layout, [(src, s[src]) for s in items], "image", seed=0)
        for src in ("speech", "text")
    }
    classes = sorted(set(labels.tolist()))
    cols = 1 + 2 * per_class
    fig, axes = plt.subplots(len(classes), cols, figsize=(1.3 * cols, 1.35 * len(classes)))
    for r, c in enumerate(classes):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        panels = [("real", items[idx[0]]["image"])]
        for src in ("speech", "text"):
            panels += [(f"from {src}", gen[src][i]) for i in idx]
        for col, (title, ids) in enumerate(panels[:cols]):
            ax = axes[r, col]
            ax.imshow(svl.image(np.asarray(ids)), cmap="gray_r", vmin=0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if col == 0:
                ax.set_ylabel(svl.classes[c], fontsize=8)
    fig.suptitle(
        "LoReTTa: images generated from speech (never paired with images) and from text", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def loss_plot(runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(runs), figsize=(4.2 * len(runs), 3.2), sharey=True, squeeze=False
    )
    for ax, (method, run) in zip(axes[0], runs.items()):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        # a resumed run logs the steps after its checkpoint again: keep each step's last record
        by_step = {r["step"]: r for r in rows if "loss" in r and "event" not in r}
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


def accuracy_plot(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"{HEADLINE}/{s}->{d}" for s, d in SEEN + MISSING]
    keys += [f"probe/{a}+{b}" for a, b in PROBES]
    methods = list(summary)
    x = np.arange(len(keys))
    w = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for i, m in enumerate(methods):
        mean = [summary[m]["mean"][k] for k in keys]
        std = [summary[m]["std"][k] for k in keys]
        ax.bar(x + i * w, mean, w, yerr=std, label=m, capsize=2)
    ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance")
    ax.set_xticks(x + w * (len(methods) - 1) / 2)
    labels = [
        k.split("/", 1)[1]
        + (" *" if any(f"{s}->{d}" in k for s, d in MISSING) or "image+speech" in k else "")
        for k in keys
    ]
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title("zero-shot and linear-probe accuracy (* = the missing pair, never seen together)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def summarise(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m, runs in results.items():
        keys = runs[0].keys()
        out[m] = {
            "mean": {k: float(np.mean([r[k] for r in runs])) for k in keys},
            "std": {k: float(np.std([r[k] for r in runs])) for k in keys},
            "per_seed": runs,
        }
    return out


def write_report(report: Path, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    def cell(m: str, k: str) -> str:
        return f"{summary[m]['mean'][k]:.3f} ± {summary[m]['std'][k]:.3f}"

    methods = list(summary)
    lines = [
        "# LoReTTa on SVL-digits",
        "",
        f"Trained on (vision, language) and (language, speech) pairs only; vision-speech is the "
        f"missing pair. Methods share data, model and token budget ({meta['steps']} steps, "
        f"seeds {meta['seeds']}); mean ± std over seeds. Chance is 0.100.",
        "",
        "## Zero-shot classification",
        "",
        "Calibrated likelihood of class prototypes (the headline): each class is scored by "
        "log p(prototype | input) - log p(prototype), averaged over its prototypes",
        "",
        "| direction | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for key, title in (
        (HEADLINE, None),
        (
            "zeroshot",
            "Plain likelihood of class prototypes, log p(prototype | input): it ranks classes "
            "by how probable their prototypes are a priori and stays near chance for image "
            "targets even on the seen text → image pair",
        ),
        (
            "zeroshot_gen",
            "By generation: sample the target modality from the input, then label "
            "the sample with a linear classifier trained on real samples of that modality",
        ),
    ):
        if title:
            lines += ["", title, "", "| direction | " + " | ".join(methods) + " |"]
            lines += ["|---|" + "---|" * len(methods)]
        for s, d in MISSING + SEEN:
            tag = " **(missing pair)**" if (s, d) in MISSING else ""
            row = " | ".join(cell(m, f"{key}/{s}->{d}") for m in methods)
            lines.append(f"| {s} → {d}{tag} | {row} |")
    lines += [
        "",
        "## Linear probe on mean-pooled hidden states",
        "",
        "| document | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for a, b in PROBES:
        tag = " **(missing pair)**" if (a, b) == ("image", "speech") else ""
        lines.append(
            f"| [{a}, {b}]{tag} | " + " | ".join(cell(m, f"probe/{a}+{b}") for m in methods) + " |"
        )
    best = max(methods, key=lambda m: summary[m]["mean"]["missing_pair"])
    lines += [
        "",
        "Missing pair, calibrated zero-shot, mean of both directions: "
        + ", ".join(f"{m} {summary[m]['mean']['missing_pair']:.3f}" for m in methods)
        + f". Best: **{best}**.",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![loss per direction](loss_per_direction.png)",
        "",
        "![generated images](generated_images.png)",
        "",
        f"Wall time {meta['wall_s']:.0f} s on {meta['device']}. Data: {meta['data']}.",
    ]
    (report / "summary.md").write_text("\n".join(lines) + "\n")


def run(
    out: Path,
    preset_name: str,
    methods: list[str],
    seeds: list[int],
    steps: int | None,
    nproc: int,
    data_root: Path,
    extra: list[str],
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
    data = {s: paths[s] for s in ("vl", "ls", "test")}
    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    runs: dict[str, Path] = {}
    for seed in seeds:
        for m in methods:
            run_dir = out / f"{m}-seed{seed}"
            ckpt = train(m, seed, run_dir, data, preset, steps, nproc, extra)
            print(f"[loretta-demo] evaluating {m} seed {seed}", flush=True)
            results[m].append(evaluate(ckpt, data, preset))
            runs.setdefault(m, run_dir)
    summary = summarise(results)
    # the report is written whole into a temp folder, then renamed over the previous one
    report = out / ".report.tmp"
    shutil.rmtree(report, ignore_errors=True)
    report.mkdir(parents=True)
    loss_plot(runs, report / "loss_per_direction.png")
    accuracy_plot(summary, report / "accuracy.png")
    gen_from = "loretta" if "loretta" in runs else next(iter(runs))
    generate_grid(runs[gen_from] / "checkpoints", data, paths.root, report / "generated_images.png")
    meta = {
        "preset": preset_name,
        "steps": steps,
        "seeds": seeds,
        "methods": methods,
        "wall_s": time.time() - t0,
        "nproc": nproc,
        "data": str(data_root),
        "device": "GPU" if torch.cuda.is_available() else f"CPU x{nproc} processes",
        "preset_settings": to_dict(preset),
    }
    metrics = {
        "meta": meta,
        "results": summary,
        "missing_pair_acc": {m: summary[m]["mean"]["missing_pair"] for m in methods},
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_report(report, summary, meta)
    replace_dir(report, out / "report")
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="loretta-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--methods", default="gpt,commutative,loretta")
    ap.add_argument("--seeds", default="0")
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
    for item in a.svl:
        key, _, value = item.partition("=")
        import yaml

        PRESETS[a.preset].data[key] = yaml.safe_load(value)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(
            f"loretta-demo: error: --methods: unknown {bad}; choose from {list(METHODS)}",
            file=sys.stderr,
        )
        return 2
    metrics = run(
        Path(a.out),
        a.preset,
        methods,
        [int(s) for s in a.seeds.split(",")],
        a.steps or None,
        a.nproc,
        Path(a.data),
        extra,
    )
    report = Path(a.out) / "report"
    print(f"\n[loretta-demo] report: {report / 'summary.md'}")
    for m, acc in metrics["missing_pair_acc"].items():
        print(
            f"[loretta-demo] missing pair (image <-> speech) calibrated zero-shot accuracy, "
            f"{m}: {acc:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
