"""Fault handling: preemption signals, a step watchdog, and the non-finite loss policy.

Exit codes (documented in README):
    0   finished
    1   error (message printed)
    3   stopped by the NaN policy (faults.nan_policy=stop, or too many skipped steps)
    4   watchdog: no step finished within engine.timeout_s (a rank died or hung)
    75  checkpointed on SIGTERM/SIGUSR1 and exited: requeue and resume with --resume auto
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

EXIT_OK = 0
EXIT_NAN = 3
EXIT_HUNG = 4
EXIT_PREEMPTED = 75


class StopTraining(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class SignalFlag:
    """Remembers SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.received: int | None = None
        self._old = {}
        for s in signals:
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        print(f"[loretta] received signal {signum}: checkpointing at the next step", flush=True)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Watchdog:
    """Ends the process if no heartbeat arrives within `timeout_s` (a dead or hung peer)."""

    def __init__(self, timeout_s: float, what: str = "training step") -> None:
        self.timeout_s, self.what = timeout_s, what
        self._last = time.monotonic()
        self._paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def pause(self, paused: bool) -> None:
        self._paused = paused
        self.beat()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if not self._paused and time.monotonic() - self._last > self.timeout_s:
                print(
                    f"[loretta] FATAL: no {self.what} finished in {self.timeout_s:.0f}s "
                    "(engine.timeout_s): a rank has died or hung; exiting with code "
                    f"{EXIT_HUNG}",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_HUNG)

    def stop(self) -> None:
        self._stop.set()


class NanPolicy:
    def __init__(self, policy: str, max_skips: int) -> None:
        self.policy, self.max_skips = policy, max_skips
        self.skipped = 0

    def check(self, step: int, applied: bool, loss: float, grad_norm: float) -> bool:
        """True if the step counts; False if it was skipped. Raises StopTraining to stop."""
        finite = applied and loss == loss and abs(loss) != float("inf")
        if finite:
            return True
        what = f"step {step}: non-finite loss {loss} / grad norm {grad_norm}"
        if self.policy == "stop":
            raise StopTraining(
                f"{what}; stopping (faults.nan_policy=stop). The update was not applied: "
                "resume from the last checkpoint with a lower optim.lr or inspect the data.",
                EXIT_NAN,
            )
        self.skipped += 1
        if self.skipped > self.max_skips:
            raise StopTraining(
                f"{what}; {self.skipped} steps skipped, more than faults.max_nan_skips="
                f"{self.max_skips}: stopping",
                EXIT_NAN,
            )
        return False
