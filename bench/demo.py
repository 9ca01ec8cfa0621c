"""The SVL-digits evidence run: every method and control on fresh seeds, scored on the test
split, with choices made beforehand on the validation split (docs/demo-results/README.md).
At the shipped 1,500 steps on 2 CPU cores: 2,615 s for the shipped recipe (the image link
gated on validation, seeds 1006-1008, commit 3dd20d0, a 2-core AMD EPYC, 2026-11-30); before
the gate, 3,459 s on the first development machine and 1,988 s on the EPYC (seeds 1003-1005,
the monitor every 500 steps instead of 50); `--preset gpu` on one H100/H200: not yet run.

    python bench/demo.py [--seeds 1006,1007,1008] [--out runs/bench-demo] [--preset bench]
                         [--jobs N]

`--preset gpu` trains nine runs at a time on the one GPU (`--jobs`); on 2 CPU cores one run at a
time uses both.

Last line: JSON with, per missing-pair direction (`image_to_speech`, `speech_to_image`), each
method's mean test accuracy (zero-shot retrieval), `diff_ci95_low`/`diff_ci95_high` (LoReTTa as
selected minus commutative, paired bootstrap over seeds x items), `vs_control` with
`vs_control_ci95_low`/`vs_control_ci95_high` (LoReTTa minus the negative control: the part of
the gain linking explains), `control_acc`, `control_in_band`, `ceiling_acc`; and `chance`,
`chance_band`, `selection_split`, `seeds`, `wall_s`, with `data_s`, `train_s`, `eval_s` (where
the time went) and `projected_full_wall_s`: with `--steps` below the preset's, the wall time of
the full preset if training time grows in proportion to the steps (null otherwise). A probe of
the GPU preset in minutes is `STEPS=demo_gpu_probe bash bench/gpu_check.sh` (on validation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loretta.demo.pipeline import PRESETS, check_overrides, count, methods_and_seeds, run
from loretta.demo.report import headline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    ap.add_argument("--seeds", default="", help="default: the preset's fresh seeds")
    ap.add_argument("--methods", default="", help="default: the preset's")
    ap.add_argument("--out", default="runs/bench-demo")
    ap.add_argument("--data", default="data/svl-digits")
    ap.add_argument("--steps", type=count, default=0)
    ap.add_argument("--nproc", type=count, default=0)
    ap.add_argument(
        "--jobs", type=count, default=0, help="training runs at a time (0: the preset's)"
    )
    a, extra = ap.parse_known_args()
    t0 = time.time()
    try:
        preset = PRESETS[a.preset]
        methods, seeds = methods_and_seeds(preset, a.methods, a.seeds)
        check_overrides(preset, methods, a.steps or preset.steps, extra)
    except ValueError as e:
        ap.error(str(e))
    m = run(
        Path(a.out),
        a.preset,
        methods,
        seeds,
        a.steps or None,
        a.nproc,
        Path(a.data),
        extra,
        "test",
        a.jobs,
    )
    print(f"report: {Path(a.out) / 'report' / 'summary.md'}")
    out = headline(m)
    out["wall_s"] = round(time.time() - t0, 1)
    out.update({k: m["meta"][k] for k in ("data_s", "train_s", "eval_s", "projected_full_wall_s")})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
