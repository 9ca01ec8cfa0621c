"""One job per run folder, and no worker outliving its launcher.

    lock = hold_run_dir(run_dir, rank)   # rank 0: flock <run_dir>/.lock for the whole run
    start_orphan_guard(launcher)         # every rank: exit when the launcher process dies

The lock is an advisory ``flock`` on ``<run_dir>/.lock`` taken by rank 0 before anything is
read or written; the holder's host, pid and job id are written into the file. A second job on
the same folder fails at once with a message naming the holder. The kernel drops the lock when
its process dies (kill -9 included), so a dead job's lock is simply taken over; the file's
old text only tells whose it was. flock works on local filesystems and on NFS (Linux emulates
it with POSIX locks); on a filesystem without locks (some Lustre mounts) it raises, and we say
so rather than run unprotected.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
import weakref
from pathlib import Path

from loretta.errors import LorettaError

LOCK_NAME = ".lock"
EXIT_ORPHANED = 5


class RunDirBusy(LorettaError):
    """Another live job holds the run folder."""


_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


def _drop_in_child() -> None:
    # flock belongs to the open file description, which fork() shares: a forked child (a
    # DataLoader worker) would keep the run folder locked after its trainer died. The child
    # closes its copy; the parent's copy keeps the lock.
    for lock in list(_HELD):
        if lock.fd >= 0:
            os.close(lock.fd)
            lock.fd = -1
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class RunLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd
        _HELD.add(self)

    def release(self) -> None:
        _HELD.discard(self)
        if self.fd >= 0:
            os.close(self.fd)  # closing the file drops the flock
            self.fd = -1

    def __del__(self) -> None:
        self.release()


def holder_text() -> str:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""
    return json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "since": int(time.time())}
    )


def describe(text: str) -> str:
    try:
        h = json.loads(text)
        job = f", job {h['job']}" if h.get("job") else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(h["since"])))
        return f"pid {h['pid']} on {h['host']}{job}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "an unknown holder"


def _holder_exited(text: str) -> bool:
    """The holder named in the lock file ran on this host and is gone or a zombie.

    Its lock can outlive it briefly: a process's main thread turns zombie at exit while its
    other threads (gloo, data loading) are still being torn down, and the kernel drops the
    flock only when the last of them has closed the file."""
    try:
        h = json.loads(text)
        if h.get("host") != socket.gethostname():
            return False
        stat = Path(f"/proc/{int(h['pid'])}/stat").read_text()
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def _try_lock(fd: int, exit_wait_s: float) -> str | None:
    """flock `fd`; if the named holder has exited on this host, wait up to `exit_wait_s`
    for the kernel to drop its lock. None: locked; else the holder's text (still held)."""
    deadline = time.monotonic() + exit_wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            if not _holder_exited(text) or time.monotonic() > deadline:
                return text
            time.sleep(0.1)


def hold_run_dir(run_dir: Path, rank: int = 0, exit_wait_s: float = 30.0) -> RunLock | None:
    """Rank 0 takes the run folder's lock (kept until the process ends or `release`).

    A live holder fails us at once; a holder that has just exited on this host (a requeued
    job restarting where the killed one ran) is waited for, up to `exit_wait_s`."""
    if rank != 0:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        text = _try_lock(fd, exit_wait_s)
    except OSError as e:
        os.close(fd)
        raise RunDirBusy(
            f"cannot lock {path} ({e}): this filesystem has no file locks. Put run.run_dir on "
            "a filesystem that supports flock (local disk, NFS, Lustre mounted with -o flock)"
        ) from e
    if text is not None:
        os.close(fd)
        if _holder_exited(text):
            raise RunDirBusy(
                f"run folder {run_dir}: its last job ({describe(text)}) has exited, but "
                f"{exit_wait_s:.0f} s later its lock file {path} is still held by a process that "
                f"inherited it (one the job started). Find it with `fuser -v {path}` and stop "
                "it before starting a job on this folder"
            )
        raise RunDirBusy(
            f"run folder {run_dir} is in use by another job ({describe(text)}; lock file "
            f"{path}). Two jobs writing and pruning one folder would corrupt it: wait for that "
            "job to end or stop it, or give this one another run.name / run.run_dir"
        )
    old = os.pread(fd, 4096, 0).decode(errors="replace")
    if old.strip():
        print(
            f"[loretta] {path}: the previous holder ({describe(old)}) has ended; taking over",
            file=sys.stderr,
            flush=True,
        )
    data = (holder_text() + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    return RunLock(path, fd)


def start_orphan_guard(launcher: str, interval_s: float = 0.5) -> threading.Thread | None:
    """Under torchrun or the deepspeed launcher, exit (code 5) within `interval_s` once the
    launcher has died: gloo/NCCL collectives between workers do not need it, so orphaned
    workers would otherwise train on, writing into the run folder beside the next job.
    A process started by hand (launcher 'none') or by srun (slurmstepd ends its tasks) is
    left alone."""
    if launcher not in ("torchrun", "deepspeed"):
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                print(
                    f"[loretta] FATAL: the launcher (pid {parent}) has died; this worker "
                    f"(pid {os.getpid()}) exits with code {EXIT_ORPHANED} instead of training "
                    "on unsupervised",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_ORPHANED)

    t = threading.Thread(target=watch, name="loretta-orphan-guard", daemon=True)
    t.start()
    return t
