"""The full SVL-digits comparison: GPT, commutative and LoReTTa, three seeds, identical data and
token budgets, on this machine (up to about an hour on 2 CPU cores). Last line: JSON with
"missing_pair_acc_loretta", "missing_pair_acc_commutative", "missing_pair_acc_gpt" (calibrated
zero-shot, mean over seeds and both missing directions), "wall_s".

    python bench/demo.py [--seeds 0,1,2] [--out runs/bench-demo] [--preset cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loretta.demo.pipeline import run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/bench-demo")
    ap.add_argument("--data", default="data/svl-digits")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--nproc", type=int, default=0)
    a, extra = ap.parse_known_args()
    t0 = time.time()
    seeds = [int(s) for s in a.seeds.split(",")]
    m = run(
        Path(a.out),
        a.preset,
        ["gpt", "commutative", "loretta"],
        seeds,
        None,
        a.nproc,
        Path(a.data),
        extra,
    )
    res = m["results"]
    print(f"report: {Path(a.out) / 'report' / 'summary.md'}")
    out = {
        "missing_pair_acc_loretta": round(res["loretta"]["mean"]["missing_pair"], 4),
        "missing_pair_acc_commutative": round(res["commutative"]["mean"]["missing_pair"], 4),
        "missing_pair_acc_gpt": round(res["gpt"]["mean"]["missing_pair"], 4),
        "missing_pair_std": {k: round(v["std"]["missing_pair"], 4) for k, v in res.items()},
        "missing_pair_acc_generation": {
            k: round(v["mean"]["missing_pair_gen"], 4) for k, v in res.items()
        },
        "missing_pair_acc_plain": {
            k: round(v["mean"]["missing_pair_plain"], 4) for k, v in res.items()
        },
        "probe_image_speech": {
            k: round(v["mean"]["probe/image+speech"], 4) for k, v in res.items()
        },
        "seen_pairs_acc": {k: round(v["mean"]["seen_pairs"], 4) for k, v in res.items()},
        "seeds": seeds,
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
