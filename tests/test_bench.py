"""The benches' quick modes run and end with their one-line JSON result."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import PY, REPO, base_env


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
