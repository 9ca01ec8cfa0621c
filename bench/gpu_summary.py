"""The figures of one bench/gpu_check.sh run as one JSON line, read from its log folder:

    mfu_1b, tokens_per_s_1b   llama_1b recipe, last logging window (compilation excluded);
                              every position of the packed rows counts, padding too
    packing_efficiency_1b     the share of those positions that hold document tokens
    mfu_1b_doc_tokens         mfu_1b x packing_efficiency_1b: document tokens only, as peers
                              that pack without padding count them
    mfu_0p4b                  the 8 x 2048-dim (~0.4B) run, for comparison with earlier checks
    gen_share                 share of a transitive training step spent generating
    gen_share_compiled        the same with compiled decode steps
    gen_tokens_per_s          {"before": host sampling, "after": on-device sampling,
                              "naive": hook-driven uncached, "compiled": compiled decode steps}
    demo_gpu_probe            the GPU preset at a few hundred steps (STEPS=demo_gpu_probe):
                              data/training/evaluation seconds and projected_full_wall_s, the
                              full preset's wall time with training scaled by the steps
    card                      the GPU's name (nvidia-smi)

MFU = tokens/s per GPU x (6N + 12·L·d·S) / peak (ANCHORS.md; N without the input embedding;
bf16 dense peak 989e12 for H100/H200). A figure is null when its step did not run.

    python bench/gpu_summary.py gpu-check/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _last_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                out = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(out, dict):
                return out
    return None


def _last_window(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    windows = [r for r in recs if "mfu" in r]
    return windows[-1] if windows else None


def summary(out: Path) -> dict[str, Any]:
    w1b = _last_window(out / "pretrain_mfu_1b_metrics.jsonl") or {}
    w04 = _last_window(out / "pretrain_mfu_metrics.jsonl") or {}
    gen = _last_json(out / "transitive_generation_cuda.txt") or {}
    card = None
    gpu = out / "gpu.txt"
    if gpu.exists():
        rows = [r for r in gpu.read_text().splitlines()[1:] if r.strip()]
        card = rows[0].split(",")[0].strip() if rows else None
    return {
        "mfu_1b": w1b.get("mfu"),
        "packing_efficiency_1b": w1b.get("packing_efficiency"),
        "mfu_1b_doc_tokens": (
            w1b["mfu"] * w1b["packing_efficiency"]
            if "mfu" in w1b and "packing_efficiency" in w1b
            else None
        ),
        "tokens_per_s_1b": w1b.get("tokens_per_s"),
        "step_time_s_1b": w1b.get("step_time_s"),
        "mem_gpu_gb_1b": w1b.get("mem_gpu_gb"),
        "mfu_0p4b": w04.get("mfu"),
        "gen_share": gen.get("generation_share"),
        "gen_share_compiled": gen.get("gen_share_compiled"),
        "gen_tokens_per_s": {
            "before": gen.get("host_tokens_per_s"),
            "after": gen.get("ours_tokens_per_s"),
            "naive": gen.get("naive_tokens_per_s"),
            "compiled": gen.get("compiled_tokens_per_s"),
        },
        "demo_gpu_probe": _probe(out / "demo_gpu_probe_metrics.json"),
        "card": card,
    }


def _probe(path: Path) -> dict[str, Any] | None:
    """The GPU preset's probe (STEPS=demo_gpu_probe): its time split and projection."""
    if not path.exists():
        return None
    meta = json.loads(path.read_text())["meta"]
    keys = ("steps", "preset_steps", "jobs", "data_s", "train_s", "eval_s", "wall_s")
    return {k: meta.get(k) for k in (*keys, "projected_full_wall_s")}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")
    print(json.dumps(summary(out)))


if __name__ == "__main__":
    main()
