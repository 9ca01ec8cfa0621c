"""Shared test helpers: run the real entry points in subprocesses (torchrun / deepspeed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MASTER_PORT=str(free_port()),
        # one ninja for every test: torch builds DeepSpeed's CPU op with the first `ninja` on
        # PATH, and the venv's (1.13) and Debian's (1.11) each rebuild what the other built
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")
        ),
    )
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def reference_stream(cfg: Any) -> Any:
    """The global stream of rows for `cfg`, computed in this one process from its start."""
    from loretta.data.loader import global_stream, open_sources

    return global_stream(cfg, *open_sources(cfg.data, cfg.run.seed))[0]


def tiny_overrides(tmp: Path, steps: int = 30, data: Path | None = None, **more: Any) -> list[str]:
    """Overrides that keep a tiny run inside `tmp` (shared synthetic data when given)."""
    o = {
        "run.run_dir": str(tmp / "run"),
        "run.steps": steps,
        "data.sources.0.path": str(data) if data else f"synthetic:{tmp / 'data'}",
        "logging.interval": 1,
        "logging.wandb": "disabled",
        "logging.progress": "never",
    }
    o.update(more)
    return [f"--{k}={v}" for k, v in o.items()]


def torchrun(
    nproc: int,
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 600,
    module: str = "loretta.pretrain",
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    env = env or base_env()
    target = [module] if module.endswith(".py") else ["-m", module]
    cmd = [
        str(BIN / "torchrun"),
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={env['MASTER_PORT']}",
        *target,
        *args,
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and res.returncode != 0:
        raise AssertionError(
            f"exit {res.returncode}\nSTDOUT:\n{res.stdout[-6000:]}\nSTDERR:\n{res.stderr[-6000:]}"
        )
    return res


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m and "event" not in m}


def spawn_torchrun(
    nproc: int, args: list[str], env: dict[str, str] | None = None, module: str = "loretta.pretrain"
) -> subprocess.Popen[str]:
    env = env or base_env()
    target = [module] if module.endswith(".py") else ["-m", module]
    cmd = [
        str(BIN / "torchrun"),
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={env['MASTER_PORT']}",
        *target,
        *args,
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )


def worker_pids(proc: subprocess.Popen[str], n: int, timeout: float = 60) -> list[int]:
    """PIDs of the training processes under a torchrun, ordered by rank."""
    import time

    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = [
            c
            for c in psutil.Process(proc.pid).children(recursive=True)
            if "loretta.pretrain" in " ".join(c.cmdline())
        ]
        if len(kids) == n:
            ranks = {k.pid: int(k.environ().get("RANK", "0")) for k in kids}
            return sorted(ranks, key=ranks.__getitem__)
        time.sleep(0.2)
    raise AssertionError("training processes did not appear")


def wait_for_step(
    run_dir: Path, step: int, proc: subprocess.Popen[str], timeout: float = 300
) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended early (exit {proc.returncode}):\n{proc.stdout.read()[-4000:] if proc.stdout else ''}"
            )
        try:
            if any(m.get("step", 0) >= step and "loss" in m for m in metrics(run_dir)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def losses_after_last_start(run_dir: Path) -> dict[int, float]:
    """Per-step losses logged by the most recent (resumed) process group."""
    rows = metrics(run_dir)
    last = max(i for i, m in enumerate(rows) if m.get("event") == "start")
    return {m["step"]: m["loss"] for m in rows[last:] if "loss" in m and "event" not in m}
