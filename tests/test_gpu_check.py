"""The CPU-runnable parts of bench/gpu_check.sh: its syntax, the summary it ends with (on logs
shaped like a GPU run's), the whole script with every step skipped, and the generation bench
it calls, in a tiny CPU mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_scripts_parse() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_wheels.sh")], check=True)


def test_summary_reads_the_logs(tmp_path: Path) -> None:
    (tmp_path / "gpu.txt").write_text(
        "name, memory.total [MiB], driver_version\nNVIDIA H200, 143771 MiB, 570.1\n"
    )
    recs = [
        {"event": "start", "step": 0},
        {"step": 10, "loss": 9.0, "mfu": 0.41, "tokens_per_s": 30000.0},
        {
            "step": 20,
            "loss": 8.0,
            "mfu": 0.52,
            "tokens_per_s": 38000.0,
            "step_time_s": 0.43,
            "packing_efficiency": 0.75,
        },
    ]
    (tmp_path / "pretrain_mfu_1b_metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in recs) + "\n"
    )
    gen = {"generation_share": 0.3, "ours_tokens_per_s": 9000.0, "host_tokens_per_s": 2000.0}
    (tmp_path / "transitive_generation_cuda.txt").write_text("log\n" + json.dumps(gen) + "\n")
    meta = {"steps": 200, "preset_steps": 3000, "jobs": 9, "data_s": 5.0, "train_s": 120.0}
    meta |= {"eval_s": 60.0, "wall_s": 185.0, "projected_full_wall_s": 1865.0}
    (tmp_path / "demo_gpu_probe_metrics.json").write_text(json.dumps({"meta": meta}))
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_summary.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["demo_gpu_probe"]["projected_full_wall_s"] == 1865.0
    assert s["demo_gpu_probe"]["train_s"] == 120.0 and s["demo_gpu_probe"]["jobs"] == 9
    assert s["mfu_1b"] == 0.52 and s["tokens_per_s_1b"] == 38000.0 and s["card"] == "NVIDIA H200"
    assert s["packing_efficiency_1b"] == 0.75 and abs(s["mfu_1b_doc_tokens"] - 0.39) < 1e-12
    assert s["gen_share"] == 0.3
    assert s["gen_tokens_per_s"]["before"] == 2000.0 and s["gen_tokens_per_s"]["after"] == 9000.0
    assert s["mfu_0p4b"] is None


def test_script_with_every_step_skipped_ends_with_the_summary(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path / "out"), STEPS="none")
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(last) >= {"mfu_1b", "tokens_per_s_1b", "gen_share", "gen_tokens_per_s", "card"}
    assert last["demo_gpu_probe"] is None


@pytest.mark.slow
def test_generation_bench_tiny_on_cpu() -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "transitive_generation.py"),
            "--dim=32",
            "--layers=1",
            "--prompts=2",
            "--new=4",
            "--steps=2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["host_tokens_per_s"] > 0 and res["ours_tokens_per_s"] > 0
    assert 0 < res["generation_share"] < 1


def test_the_gpu_preset_probe_command_is_valid() -> None:
    """The demo_gpu_probe step runs only on a GPU: its methods and recipe overrides are checked
    here as loretta-demo checks them, so that a renamed method or field cannot rot it unseen."""
    import re
    import shlex

    from loretta.demo.pipeline import PRESETS, build_parser, check_overrides, methods_and_seeds

    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    block = text[text.index("step demo_gpu_probe") :]
    block = block[: block.index("\n  for f in")].replace("\\\n", " ")
    words = shlex.split(re.sub(r'"\$\{[A-Z_]+:-([^}]*)\}"', r"\1", block))
    args = words[words.index("loretta.demo.pipeline") + 1 :]
    a, extra = build_parser().parse_known_args(args)
    assert a.preset == "gpu" and a.split == "val" and a.steps == 200
    methods, _ = methods_and_seeds(PRESETS["gpu"], a.methods, a.seeds)
    assert len(methods) == 6 and all("ungated" in m for m in methods if "loretta" in m)
    check_overrides(PRESETS["gpu"], methods, a.steps, extra)
