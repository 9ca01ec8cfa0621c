"""The pretrain entry point: dry run, printed config, errors before any process group."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from helpers import PY, REPO, base_env, tiny_overrides


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "loretta.pretrain", *args],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_print_config_is_the_resolved_yaml(tmp_path: Path) -> None:
    res = run(["--config", "tiny", "--print-config", "--optim.lr=1e-3"])
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["optim"]["lr"] == 1e-3


def test_bad_config_fails_fast_with_every_problem() -> None:
    res = run(["--config", "tiny", "--optim.lr=-1", "--model.n_heads=5"])
    assert res.returncode == 2
    assert "optim.lr=-1.0" in res.stderr and "model.n_heads=5" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_data_fails_before_process_group(tmp_path: Path) -> None:
    res = run(
        [
            "--config",
            "tiny",
            f"--data.sources.0.path={tmp_path / 'nowhere'}",
            "--data.sources.0.synthetic=null",
            f"--run.run_dir={tmp_path / 'run'}",  # not the recipe's runs/ in the checkout
        ]
    )
    assert res.returncode == 2
    assert f"dataset folder '{tmp_path / 'nowhere'}' does not exist" in res.stderr


def test_mistyped_path_never_generates_synthetic_data(tmp_path: Path) -> None:
    # the recipe's source has a synthetic: block, but a plain path is real data only
    res = run(
        [
            "--config",
            "tiny",
            f"--data.sources.0.path={tmp_path / 'typo'}",
            f"--run.run_dir={tmp_path / 'run'}",
        ]
    )
    assert res.returncode == 2, res.stderr
    assert f"data.sources.0.path={str(tmp_path / 'typo')!r}: no dataset there" in res.stderr
    assert f"data.sources.0.path=synthetic:{tmp_path / 'typo'}" in res.stderr  # the fix
    assert "Traceback" not in res.stderr and not (tmp_path / "typo").exists()


def test_dry_run(tmp_path: Path, tiny_data: Path) -> None:
    res = run(["--config", "tiny", "--dry-run", *tiny_overrides(tmp_path, data=tiny_data)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dry run OK" in res.stdout and "8x128" in res.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
