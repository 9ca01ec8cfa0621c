"""Launch a local multi-process run (torchrun) from Python: used by the demo and the tools."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_nproc() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2  # two CPU processes: real ZeRO-3 sharding over gloo


def torchrun_pretrain(
    config: str, overrides: list[str], nproc: int, cwd: Path | None = None
) -> int:
    """Run `python -m loretta.pretrain` under torchrun on this machine; returns its exit code."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # the venv's tools first: DeepSpeed builds its CPU op with the first `ninja` on PATH, and
    # two different ninjas keep rebuilding each other's output
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # DeepSpeed's CPU comm op is compiled once per environment: keep each venv's build apart
    # (a shared ~/.cache build is rebuilt, under one lock, whenever another venv uses it)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "loretta.pretrain",
        "--config",
        config,
        *overrides,
    ]
    return subprocess.call(cmd, env=env, cwd=cwd)
