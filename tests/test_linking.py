"""The synthetic linking check: LoReTTa links a modality pair never seen together, where
commutative-only training (same data, same steps) does not. Slow (a few minutes), run in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import BIN


@pytest.mark.slow
def test_transitive_training_links_the_missing_pair(tmp_path: Path) -> None:
    from loretta.linking import run

    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    summary = run(tmp_path, steps=200, seeds=[1], nproc=1)
    lor, com = summary["loretta/missing_pair"], summary["commutative/missing_pair"]
    # chance is 0.10; measured on a 2-core CPU: loretta 0.70-0.77, commutative 0.38-0.44
    assert lor > com + 0.15, summary
    assert lor > 0.5, summary
    # both learned the pairs they saw
    for m in ("loretta", "commutative"):
        assert summary[f"{m}/a->b"] > 0.6 and summary[f"{m}/b->c"] > 0.6, summary
