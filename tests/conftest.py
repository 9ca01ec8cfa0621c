from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords hold the folder names of the
        # path too, so a checkout under a folder named gpu would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def private_tmpdir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A temp dir of this test session's own: mosaicml-streaming keeps file locks in the temp
    dir, and sharing the machine's with other jobs lets their locks collide with ours."""
    tmp = tmp_path_factory.getbasetemp() / "streaming-tmp"
    tmp.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe's synthetic dataset, built once per test session."""
    from loretta.config import load_config
    from loretta.data.synthetic import ensure_synthetic

    path = tmp_path_factory.mktemp("tinydata") / "synthetic-tiny"
    cfg = load_config("tiny")
    syn = cfg.data.sources[0].synthetic
    assert syn is not None
    ensure_synthetic(path, syn)
    return path
