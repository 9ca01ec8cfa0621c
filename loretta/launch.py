"""Launch local multi-process runs (torchrun) from Python: used by the demo and the tools.

`run_jobs` runs a batch of them, several at once where they are independent: on one GPU the
demo's small models leave most of the device idle, and a branch can start as soon as the trunk
has written the checkpoint it starts from.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_nproc() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2  # two CPU processes: real ZeRO-3 sharding over gloo


def torchrun_env() -> dict[str, str]:
    """The environment a local torchrun of loretta.pretrain needs."""
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
    return env


def torchrun_command(config: str, overrides: list[str], nproc: int) -> list[str]:
    """`python -m torch.distributed.run ... -m loretta.pretrain`; the rendezvous port is picked
    now, so build it just before it runs."""
    return [
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


def torchrun_pretrain(
    config: str, overrides: list[str], nproc: int, cwd: Path | None = None
) -> int:
    """Run `python -m loretta.pretrain` under torchrun on this machine; returns its exit code."""
    return subprocess.call(torchrun_command(config, overrides, nproc), env=torchrun_env(), cwd=cwd)


@dataclass
class Job:
    """One process of a batch. It starts once the job named `after` has succeeded, or earlier
    when `ready()` says so (a branch needs only the trunk's checkpoint at its start step); it
    never starts if that job failed."""

    name: str
    command: Callable[[], list[str]]  # called at start (a rendezvous port must still be free)
    env: dict[str, str]
    log: Path | None = None  # stdout and stderr go here; None: this process's console
    after: str | None = None
    ready: Callable[[], bool] | None = None


def run_jobs(
    jobs: list[Job], parallel: int, poll_s: float = 0.2, say: Callable[[str], None] = print
) -> list[str]:
    """Run `jobs`, at most `parallel` at once, each started in list order once it may start.
    Returns the failed jobs as 'name: why' ([] when all succeeded). After a failure no new job
    starts; those running finish (their checkpoints stay usable for a rerun)."""
    if parallel < 1:
        raise ValueError(f"parallel={parallel}: at least 1 job must run at a time")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names repeat: {names}")
    unknown = sorted({j.after for j in jobs if j.after is not None} - set(names))
    if unknown:
        raise ValueError(f"jobs wait for jobs not in the batch: {unknown}")
    waiting = list(jobs)
    running: dict[str, tuple[subprocess.Popen[bytes], IO[bytes] | None, float, Job]] = {}
    ok: set[str] = set()
    failed: dict[str, str] = {}

    def may_start(j: Job) -> bool:
        if j.after is None or j.after in ok:
            return True
        return j.after in running and j.ready is not None and j.ready()

    try:
        while waiting or running:
            for name, (proc, fh, t0, job) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                if fh is not None:
                    fh.close()
                where = f" (log: {job.log})" if job.log else ""
                if code == 0:
                    ok.add(name)
                    say(f"{name}: done in {time.time() - t0:.0f} s")
                else:
                    failed[name] = f"exit {code}{where}"
                    say(f"{name}: FAILED, exit {code}{where}{_tail(job.log)}")
            if failed:  # no new job starts after a failure
                for j in waiting:
                    why = f"{j.after} failed" if j.after in failed else "an earlier job failed"
                    failed[j.name] = f"not started: {why}"
                waiting = []
            for j in list(waiting):
                if len(running) >= parallel:
                    break
                if not may_start(j):
                    continue
                waiting.remove(j)
                fh = None
                if j.log is not None:
                    j.log.parent.mkdir(parents=True, exist_ok=True)
                    fh = open(j.log, "ab")  # appends: a resumed job keeps its first attempt's log
                try:
                    proc = subprocess.Popen(j.command(), env=j.env, stdout=fh, stderr=fh)
                except BaseException:
                    if fh is not None:
                        fh.close()
                    raise
                running[j.name] = (proc, fh, time.time(), j)
                say(f"{j.name}: started" + (f" (log: {j.log})" if j.log else ""))
            if waiting and not running:  # only a cycle of `after`s leaves nothing to run
                raise ValueError(f"jobs wait for each other: {[j.name for j in waiting]}")
            if running:
                time.sleep(poll_s)
    finally:
        for proc, _, _, _ in running.values():  # interrupted: stop the children too
            proc.terminate()
        for proc, fh, _, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if fh is not None:
                fh.close()
    return [f"{n}: {why}" for n, why in failed.items()]


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n" + "\n".join(f"    {line}" for line in text)
