"""Every benchmark in bench/ runs in its --tiny mode and ends with one JSON line.

Not a measurement (tiny sizes on a shared CPU): this keeps the scripts working as the code
under them changes. bench/convert.py has its own tiny test below (it builds a real ZeRO-3 checkpoint), bench/demo.py
is the demo pipeline exercised by test_readme.py; bench/gpu_check.sh needs a GPU.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import PY, REPO, base_env

# script -> keys its last line must hold
BENCHES = {
    "data_throughput.py": ("tokens_per_s", "ratio_vs_webdataset", "ratio_vs_streaming"),
    "model_step.py": ("ratio", "packed_ratio", "ours_ms", "packed_ours_ms"),
    "transitive_generation.py": ("ratio", "ratio_vs_naive", "gen_share", "hooks_kv_tokens_per_s"),
    "zero3_memory.py": ("max_ratio_to_ideal", "ratio_world2", "total_bytes_world1"),
    "checkpoint_verify.py": ("verify_s", "bytes", "gb_per_s"),
    "planner_scale.py": ("rows_per_s", "cost_ratio_4096_vs_8", "worker_speedup_4", "fill"),
}
# convert.py: test_convert_bench_tiny below; loss_memory.py: tests/test_loss.py; gpu_summary.py:
# tests/test_gpu_check.py; demo.py: the pipeline test in tests/test_readme.py
ELSEWHERE = {"convert.py", "demo.py", "gpu_check.sh", "gpu_summary.py", "loss_memory.py"}
# what libraries keep in TMPDIR by design: compiler caches (torch inductor, triton, DeepSpeed
# JIT ops) and torchrun's per-launch log folders (torch.distributed.elastic never removes them)
LIBRARY_FILES = ("torchinductor_", "triton", "torch_extensions", "torchelastic_")


def test_every_bench_script_has_a_tiny_run_here() -> None:
    shipped = {p.name for p in (REPO / "bench").iterdir() if p.suffix in (".py", ".sh")}
    assert shipped == set(BENCHES) | ELSEWHERE, shipped ^ (set(BENCHES) | ELSEWHERE)


@pytest.mark.parametrize("script", sorted(BENCHES))
def test_bench_tiny_mode(script: str, tmp_path: Path) -> None:
    args = [PY, str(REPO / "bench" / script), "--tiny"]
    if script == "data_throughput.py":
        args += ["--work", str(tmp_path / "work")]  # its cached data and streaming's locks
    tmp = tmp_path / "tmp"  # the benches' own temporary folders land here
    tmp.mkdir()
    env = {**base_env(), "TMPDIR": str(tmp)}
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # shards, runs and checkpoints of a bench are its own: none is left behind
    # (whatever their names); the libraries' own files are not a bench's data and may stay
    left = [p.name for p in tmp.iterdir() if not p.name.startswith(LIBRARY_FILES)]
    assert not left, left
    last = json.loads(res.stdout.strip().splitlines()[-1])
    for key in BENCHES[script]:
        assert key in last, (key, last)
        assert not isinstance(last[key], float) or last[key] > 0, (key, last)


@pytest.mark.slow
def test_convert_bench_tiny(tmp_path: Path) -> None:
    res = subprocess.run(
        [PY, str(REPO / "bench" / "convert.py"), "--tiny", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=base_env(),
        cwd=REPO,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["bench"] == "convert" and result["mode"] == "tiny"
    assert result["params"] == 131_392  # dim 64, 2 layers, vocabulary 192, untied output
    assert result["outputs_bitwise_equal"] is True
    for key in ("time_ratio", "peak_rss_over_model_bytes", "ours_s", "theirs_s"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert set(result["samples_s"]) == {"ours", "theirs"}
    # the two exports are removed, the checkpoint is kept for the next run
    assert not (tmp_path / "out_ours").exists() and not (tmp_path / "out_theirs").exists()
    assert (tmp_path / "run" / "checkpoints").is_dir()
