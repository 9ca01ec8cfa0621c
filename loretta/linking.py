"""The synthetic linking check: does transitive training link two modalities never seen together?

Three synthetic modalities a, b, c share class structure but not token patterns (each modality
maps classes to patterns through its own permutation). Training sees (a, b) and (b, c) pairs
only. Commutative-only training and LoReTTa (commutative + transitive) get the same data and
steps; both are scored on zero-shot a -> c and c -> a classification (conditional likelihood of
class prototypes) on held-out aligned triples.

    python tools/linking_check.py --out runs/linking --steps 150
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

RECIPE = "tiny_loretta"
METHODS = {
    "commutative": ["--objective.links=[]"],
    "loretta": [],
}


def build_data(root: Path) -> dict[str, Path]:
    from loretta.config import load_config
    from loretta.data.synthetic import ensure_synthetic

    cfg = load_config(RECIPE)
    paths = {}
    for s in cfg.data.sources:
        assert s.synthetic is not None
        paths[s.name] = root / s.name
        ensure_synthetic(paths[s.name], s.synthetic)
    syn = cfg.data.sources[0].synthetic
    assert syn is not None
    test = type(syn)(**{**vars(syn), "samples": 400, "seed": 99, "present": []})
    paths["test"] = root / "test"
    ensure_synthetic(paths["test"], test)
    return paths


def train(
    method: str,
    out: Path,
    data: dict[str, Path],
    steps: int,
    seed: int,
    nproc: int,
    extra: list[str] | None = None,
) -> Path:
    from loretta.launch import torchrun_pretrain

    run = out / f"{method}-seed{seed}"
    over = [
        f"--run.run_dir={run}",
        f"--run.steps={steps}",
        f"--run.seed={seed}",
        f"--data.sources.0.path={data['ab']}",
        f"--data.sources.1.path={data['bc']}",
        "--logging.wandb=disabled",
        f"--logging.interval={max(1, steps // 10)}",
        *METHODS[method],
        *(extra or []),
    ]
    code = torchrun_pretrain(RECIPE, over, nproc)
    if code != 0:
        raise RuntimeError(f"training {method} (seed {seed}) failed with exit code {code}")
    return run / "checkpoints"


def evaluate(ckpt: Path, data: dict[str, Path], per_class: int = 3) -> dict[str, float]:
    from loretta.checkpoint.load import load_model
    from loretta.eval import labelled, prototypes_from, zero_shot

    model, layout = load_model(ckpt)
    test, y = labelled(str(data["test"]), ["a", "b", "c"])
    res = {}
    for src, dst, proto_set in (
        ("a", "c", "bc"),
        ("c", "a", "ab"),
        ("a", "b", "bc"),
        ("b", "c", "bc"),
    ):
        protos = prototypes_from(str(data[proto_set]), dst, per_class)
        pred, _ = zero_shot(model, layout, [(src, s[src]) for s in test], protos)
        res[f"{src}->{dst}"] = float((pred == y).mean())
    return res


def run(
    out: Path, steps: int, seeds: list[int], nproc: int = 2, extra: list[str] | None = None
) -> dict[str, Any]:
    data = build_data(out / "data")
    results: dict[str, Any] = {m: [] for m in METHODS}
    for seed in seeds:
        for method in METHODS:
            ckpt = train(method, out, data, steps, seed, nproc, extra)
            results[method].append(evaluate(ckpt, data))
    summary: dict[str, Any] = {"steps": steps, "seeds": seeds, "per_seed": results}
    for m in METHODS:
        for d in ("a->c", "c->a", "a->b", "b->c"):
            vals = [r[d] for r in results[m]]
            summary[f"{m}/{d}"] = float(np.mean(vals))
        summary[f"{m}/missing_pair"] = float(
            np.mean([(r["a->c"] + r["c->a"]) / 2 for r in results[m]])
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="linking_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default="runs/linking")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--nproc", type=int, default=2)
    a, extra = ap.parse_known_args(argv)  # the rest: config overrides for both methods
    summary = run(Path(a.out), a.steps, [int(s) for s in a.seeds.split(",")], a.nproc, extra)
    for m in METHODS:
        print(
            f"{m:12s} missing pair (a<->c) {summary[f'{m}/missing_pair']:.3f}  "
            f"seen pairs a->b {summary[f'{m}/a->b']:.3f} b->c {summary[f'{m}/b->c']:.3f}"
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
