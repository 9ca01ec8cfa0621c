"""Rank discovery from launcher environments, as a pure function of the environment.

Supported: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), the deepspeed launcher
(same, but LOCAL_SIZE and a --local_rank argument), and SLURM srun with one task per device
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE).
Launcher variables win over SLURM's: inside an sbatch job that runs torchrun, torchrun's count.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun | deepspeed | slurm | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def env(self) -> dict[str, str]:
        """The torch.distributed env:// variables for this process."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    v = env.get(key, "")
    try:
        return int(v) if v != "" else default
    except ValueError:
        raise ValueError(f"environment variable {key}={v!r} is not an integer") from None


def slurm_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={value!r} is not understood")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist (uses scontrol when available, else a simple parse)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
    if not m:
        return nodelist
    return m.group(1) + (m.group(2) or "")


def discover(env: Mapping[str, str] | None = None, argv: list[str] | None = None) -> DistInfo:
    env = dict(os.environ if env is None else env)
    argv = list(argv or [])
    port = _int(env, "MASTER_PORT", 29500)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = (
            "deepspeed"
            if ("LOCAL_SIZE" in env or any(a.startswith("--local_rank") for a in argv))
            else "torchrun"
        )
        local_rank = _int(env, "LOCAL_RANK", -1)
        for a in argv:
            if a.startswith("--local_rank="):
                local_rank = int(a.split("=", 1)[1])
        rank, world = _int(env, "RANK", 0), _int(env, "WORLD_SIZE", 1)
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world))
        return DistInfo(
            rank=rank,
            world_size=world,
            local_rank=max(local_rank, 0) if local_rank >= 0 else rank % max(local_world, 1),
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            launcher=launcher,
        )
    if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        world = _int(env, "SLURM_NTASKS", 1)
        node = _int(env, "SLURM_NODEID", 0)
        per_node = env.get("SLURM_TASKS_PER_NODE", "")
        counts = slurm_tasks_per_node(per_node) if per_node else []
        local_world = counts[node] if node < len(counts) else _int(env, "SLURM_NTASKS_PER_NODE", 1)
        addr = env.get("MASTER_ADDR") or first_slurm_host(
            env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        )
        if "MASTER_PORT" not in env:
            port = 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000
        return DistInfo(
            rank=_int(env, "SLURM_PROCID", 0),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=local_world,
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistInfo(master_port=port)
