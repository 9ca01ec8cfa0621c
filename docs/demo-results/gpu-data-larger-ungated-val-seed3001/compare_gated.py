"""Ungated - gated on the same trunk and items: this report against
gpu-data-larger-val-seed3001/ (run B's trunk, seed 3001, validation). Run from the repository
root: python docs/demo-results/gpu-data-larger-ungated-val-seed3001/compare_gated.py"""

import json
from pathlib import Path

from loretta.demo.report import paired_diff

here = Path(__file__).parent
ungated = json.loads((here / "metrics.json").read_text())["per_seed"]
gated = json.loads((here.parent / "gpu-data-larger-val-seed3001" / "metrics.json").read_text())[
    "per_seed"
]
# the same trunk scored twice: every item must agree, or the pairing is void
assert ungated["commutative"] == gated["commutative"], "the trunks' items differ"
pairs = [
    ("loretta_ungated", "control_ungated", ungated, ungated),
    ("loretta_ungated", "loretta", ungated, gated),
    ("control_ungated", "control", ungated, gated),
]
for a, b, ra, rb in pairs:
    for key, v in paired_diff(ra[a], rb[b]).items():
        lo, hi = v["ci95"]
        print(f"{a} - {b}  {key:28s} {v['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
