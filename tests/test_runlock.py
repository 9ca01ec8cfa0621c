"""One job per run folder, and workers that do not outlive their launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import PY, base_env, spawn_torchrun, tiny_overrides, wait_for_step, worker_pids

from loretta.train.runlock import LOCK_NAME, RunDirBusy, hold_run_dir


def test_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    lock = hold_run_dir(tmp_path / "run")
    assert lock is not None
    holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(RunDirBusy, match=rf"in use by another job \(pid {os.getpid()} on "):
        hold_run_dir(tmp_path / "run")
    assert hold_run_dir(tmp_path / "run", rank=1) is None  # only rank 0 locks
    lock.release()
    again = hold_run_dir(tmp_path / "run")
    assert again is not None
    again.release()


def test_a_dead_jobs_lock_is_taken_over(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code = (
        "import sys, os; from pathlib import Path; from loretta.train.runlock import hold_run_dir;"
        f"l = hold_run_dir(Path({str(run)!r})); os.kill(os.getpid(), 9)"
    )
    res = subprocess.run([PY, "-c", code], env=base_env(), capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    dead = json.loads((run / LOCK_NAME).read_text())["pid"]
    lock = hold_run_dir(run)  # the kernel dropped the dead process's flock
    assert lock is not None
    assert f"previous holder (pid {dead} on" in capfd.readouterr().err
    lock.release()


def test_a_forked_child_does_not_keep_a_dead_jobs_lock(tmp_path: Path) -> None:
    # DataLoader workers are forked from the trainer; flock is shared across fork, so without
    # care a worker outliving its trainer would keep the folder locked
    run = tmp_path / "run"
    code = (
        "import os, sys, time; from pathlib import Path; "
        "from loretta.train.runlock import hold_run_dir; "
        f"l = hold_run_dir(Path({str(run)!r})); pid = os.fork()\n"
        "if pid == 0:\n    os.closerange(0, 3); time.sleep(60); os._exit(0)\n"
        "print(pid, flush=True); os.kill(os.getpid(), 9)"
    )
    res = subprocess.run([PY, "-c", code], env=base_env(), capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    child = int(res.stdout.split()[0])
    try:
        assert not _gone(child)  # the forked child still runs ...
        lock = hold_run_dir(run)  # ... and yet the folder is free
        assert lock is not None
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def _exited_holder_with_heir(run: Path) -> int:
    """A job that took the lock, started a process inheriting the lock file, and was killed.
    Returns the heir's pid: it keeps the flock although the named holder is gone."""
    code = (
        "import os, subprocess, sys; from pathlib import Path; "
        "from loretta.train.runlock import hold_run_dir; "
        f"l = hold_run_dir(Path({str(run)!r})); "
        "c = subprocess.Popen(['sleep', '60'], pass_fds=(l.fd,), stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); "
        "print(c.pid, flush=True); os.kill(os.getpid(), 9)"
    )
    res = subprocess.run([PY, "-c", code], env=base_env(), capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    return int(res.stdout.split()[0])


def test_a_just_exited_holder_is_waited_for(tmp_path: Path) -> None:
    # a requeued job restarting on the node where the killed one ran: the kernel may drop the
    # old lock a moment after the old process is gone (its other threads still exiting)
    run = tmp_path / "run"
    heir = _exited_holder_with_heir(run)
    killer = threading.Timer(1.0, os.kill, (heir, signal.SIGKILL))
    killer.start()
    try:
        t0 = time.time()
        lock = hold_run_dir(run, exit_wait_s=20)
        assert lock is not None and 0.9 < time.time() - t0 < 15
        lock.release()
    finally:
        killer.cancel()
        if not _gone(heir):
            os.kill(heir, signal.SIGKILL)


def test_a_lock_kept_by_an_heir_is_named_after_the_wait(tmp_path: Path) -> None:
    run = tmp_path / "run"
    heir = _exited_holder_with_heir(run)
    try:
        t0 = time.time()
        with pytest.raises(RunDirBusy, match=r"has exited, but 1 s later .* `fuser -v "):
            hold_run_dir(run, exit_wait_s=1)
        assert 0.9 < time.time() - t0 < 10
    finally:
        os.kill(heir, signal.SIGKILL)


def test_a_live_holder_is_refused_without_waiting(tmp_path: Path) -> None:
    lock = hold_run_dir(tmp_path / "run")
    t0 = time.time()
    with pytest.raises(RunDirBusy, match="in use by another job"):
        hold_run_dir(tmp_path / "run", exit_wait_s=30)
    assert time.time() - t0 < 2
    assert lock is not None
    lock.release()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_second_job_fails_at_once_and_orphans_exit(tmp_path: Path, tiny_data: Path) -> None:
    over = ["--config", "tiny", *tiny_overrides(tmp_path, steps=400, data=tiny_data)]
    proc = spawn_torchrun(2, over)
    pids = worker_pids(proc, 2)
    try:
        wait_for_step(tmp_path / "run", 2, proc)
        t0 = time.time()
        second = subprocess.run(
            [PY, "-m", "loretta.pretrain", *over],
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another job (pid {pids[0]} on " in second.stderr
        assert "Traceback" not in second.stderr and time.time() - t0 < 60
        # the launcher dies without a chance to clean up: its workers must not train on
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 10
        while time.time() < deadline and not all(_gone(p) for p in pids):
            time.sleep(0.2)
        assert all(_gone(p) for p in pids), "workers outlived their launcher by 10 s"
        assert hold_run_dir(tmp_path / "run") is not None  # and the folder is free again
    finally:
        proc.kill()
        for pid in pids:  # orphans are no longer our children: end them by pid
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
