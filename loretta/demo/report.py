"""The demo's report: per-method summaries with sample stds and paired bootstrap intervals,
summary.md, plots, and the one-line headline bench/demo.py prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from loretta.demo.methods import METHODS, TRUNK
from loretta.demo.scoring import GENERATOR, MISSING, SEEN
from loretta.stats import chance_band, fmt_mean_std, mean_std, paired_bootstrap


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
            if m != TRUNK:
                out["diff"][m] = paired_diff(per_seed[m], per_seed[TRUNK])
    # LoReTTa - its control: the gain that linking explains. When the control gains over
    # commutative too (documents of the same shape teach something), only this part is linking
    if "loretta" in per_seed and "control" in per_seed:
        out["vs_control"] = paired_diff(per_seed["loretta"], per_seed["control"])
    return out


def paired_diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Per score: the mean of a - b over the same seeds and items, with its 95% bootstrap
    interval over seeds x items."""
    out = {}
    for key in a[0]["items"]:
        d, lo, hi = paired_bootstrap(
            [np.asarray(r["items"][key]) for r in a],
            [np.asarray(r["items"][key]) for r in b],
            seed=0,
        )
        out[key] = {"mean": d, "ci95": [lo, hi]}
    return out


def ci_cells(v: dict[str, Any]) -> str:
    """'difference | [low, high]' for a report table, marked when the interval is above 0."""
    verdict = " **> 0**" if v["ci95"][0] > 0 else ""
    return f"{v['mean']:+.3f} | [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]{verdict}"


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
        lines += [
            f"| {m} | {k} | {ci_cells(v)} |" for m, by in s["diff"].items() for k, v in by.items()
        ]
        lines.append("")
    if s.get("vs_control"):
        lines += [
            "`loretta` − `control` (the same documents and compute, prompts from another class): "
            "the part of the gain that linking explains, 95% bootstrap interval over seeds × "
            "items. A control that gains over `commutative` is outside what linking explains.",
            "",
            "| score | difference | 95% CI |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {ci_cells(v)} |" for k, v in s["vs_control"].items()]
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
        *(
            [
                "The live linking monitor (validation split, during training): missing-pair "
                "retrieval and the class information of the generator's samples.",
                "",
                "![monitor](monitor.png)",
                "",
            ]
            if meta.get("monitor_plot")
            else []
        ),
        f"Wall time {meta['wall_s']:.0f} s{time_split(meta)} on {meta['device']}{host_line(meta)}. "
        f"Data: {meta['data']}. "
        f"Pseudo-modality decoding per method: {meta['decoding']}.",
    ]
    (report / "summary.md").write_text("\n".join(lines) + "\n")


def time_split(meta: dict[str, Any]) -> str:
    """' (data 12 s, training 340 s, evaluation 95 s)', or '' for reports from before the split."""
    if "train_s" not in meta:
        return ""
    full = meta.get("projected_full_wall_s")
    return (
        f" (data {meta['data_s']:.0f} s, training {meta['train_s']:.0f} s, "
        f"evaluation {meta['eval_s']:.0f} s"
        + (
            f"; at the preset's {meta['preset_steps']} steps about {full:.0f} s, training "
            "time taken as proportional to the steps"
            if full is not None
            else ""
        )
        + ")"
    )


def run_records(method: str, run: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl records; a branch's come after its trunk's up to the branch."""
    files = [run / "metrics.jsonl"]
    if METHODS[method].branch:
        files.insert(0, run.parent / f"{TRUNK}-{run.name.split('-')[-1]}" / "metrics.jsonl")
    return [json.loads(x) for f in files if f.exists() for x in f.read_text().splitlines()]


def loss_plot(runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(runs), figsize=(4.2 * len(runs), 3.2), sharey=True, squeeze=False
    )
    for ax, (method, run) in zip(axes[0], runs.items()):
        rows = run_records(method, run)
        # a resumed run logs the steps after its checkpoint again: keep each step's last record
        by_step: dict[int, dict[str, Any]] = {}
        for r in rows:
            if "loss" in r and "event" not in r:
                by_step[r["step"]] = r
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


def monitor_plot(runs: dict[str, Path], out: Path) -> bool:
    """The live linking monitor's validation curves (monitor/... metrics), one panel per score;
    a branch's curve continues its trunk's. False when no run logged any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for method, run in runs.items():
        for r in run_records(method, run):
            for k, v in r.items():
                if k.startswith("monitor/"):
                    curves.setdefault(k.removeprefix("monitor/"), {}).setdefault(method, []).append(
                        (r["step"], v)
                    )
    if not curves:
        return False
    keys = sorted(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for method, pts in curves[k].items():
            pts = sorted(dict(pts).items())
            ax.plot(*zip(*pts), label=method, lw=1)
        ax.axhline(0.1, color="gray", ls=":", lw=1)
        ax.set_title(k, fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("validation accuracy")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


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


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures bench/demo.py prints: per missing direction and method, the mean accuracy;
    the paired intervals of LoReTTa (selected) - commutative and LoReTTa - control; control
    (and whether it is in the chance band), ceiling, chance."""
    s = metrics["summary"]
    out: dict[str, Any] = {}
    for a, b in MISSING:
        key = f"retrieval/{a}->{b}"
        d: dict[str, Any] = {m: round(v[key]["mean"], 4) for m, v in s["methods"].items()}
        # LoReTTa - commutative (`diff`) and LoReTTa - control (`vs_control`), paired
        for name, by in (
            ("diff", s["diff"].get("loretta", {})),
            ("vs_control", s.get("vs_control", {})),
        ):
            if key in by:
                d[name] = round(by[key]["mean"], 4)
                d[f"{name}_ci95_low"], d[f"{name}_ci95_high"] = (
                    round(x, 4) for x in by[key]["ci95"]
                )
        if "control" in s["methods"]:
            d["control_acc"] = d["control"]
            lo, hi = s["chance_band"]
            d["control_in_band"] = bool(lo <= d["control"] <= hi)
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


def host_line(meta: dict[str, Any]) -> str:
    """' (CPU model or GPU, torch version)' from the report's host record; '' for reports
    written before it was kept."""
    h = meta.get("host")
    if not h:
        return ""
    return f" ({h.get('gpu') or h.get('cpu', '?')}, torch {h.get('torch', '?')})"
