"""Training metrics: per-direction/per-modality losses, throughput, MFU; JSON lines + wandb.

MFU = tokens/s per device x FLOPs per token / peak FLOP/s per device, with
FLOPs per token = 6N + 12*L*d*S (N without the input embedding; no causal discount; see
DecoderConfig.flops_per_token). Peaks: H100/H200 989e12, A100 312e12 (bf16 dense); on a CPU
the peak is measured once with a matrix multiply in the run's dtype (fp32 or bf16), and
logging.peak_flops overrides all.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def detect_peak_flops(
    device: torch.device, override: float = 0.0, precision: str = "fp32"
) -> tuple[float, str]:
    if override > 0:
        return override, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAKS.items():
            if key in name:
                return peak, f"{key} bf16 dense"
        return 0.0, f"unknown GPU {name!r}: set logging.peak_flops"
    # in the run's own dtype: a CPU with bf16 dot products runs bf16 GEMMs several times faster
    # than fp32 ones (5x on the AVX-512 EPYC host), and an fp32 peak gave a bf16 run MFU > 100%
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_cpu_flops(dtype=dtype), f"measured {precision} GEMM (this CPU)"


def measure_cpu_flops(
    n: int = 512, reps: int = 8, tries: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """The best of `tries` timings of `reps` n x n matmuls: other processes on the same cores
    (the other ranks, data workers) only ever slow one down."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best


def host_info(device: torch.device) -> dict[str, str]:
    """What a run's numbers depend on besides its config and seed: the library versions and the
    processor. A run repeats bit for bit on the same host, but another CPU or GPU rounds fp32
    sums in another order (its BLAS kernels), and training that samples pseudo-modalities from
    the model then takes another path (docs/demo-results/README.md has an example)."""
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("deepspeed", "loretta"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    info["cpu"] = cpu_model()
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class LossStats:
    """Sums of per-token losses by direction and by target modality between log steps."""

    def __init__(self, directions: list[str], modalities: list[str], device: torch.device) -> None:
        self.directions, self.modalities = directions, modalities
        D, M = len(directions), len(modalities)
        self.sums = torch.zeros(2 * (D + M) + 2, dtype=torch.float64, device=device)
        self.D, self.M = D, M

    def add(
        self,
        tok_loss: torch.Tensor,
        valid: torch.Tensor,
        direction: torch.Tensor,
        modality: torch.Tensor,
    ) -> None:
        """tok_loss, valid, direction, modality: flat (N,) tensors for one micro-batch."""
        tl = tok_loss.detach().double() * valid
        D, M = self.D, self.M
        d = direction.clamp(min=0)
        dv = valid & (direction >= 0)
        self.sums[:D].index_add_(0, d, tl * dv)
        self.sums[D : 2 * D].index_add_(0, d, dv.double())
        m = modality.clamp(min=0)
        mv = valid & (modality >= 0)
        self.sums[2 * D : 2 * D + M].index_add_(0, m, tl * mv)
        self.sums[2 * D + M : 2 * D + 2 * M].index_add_(0, m, mv.double())
        self.sums[-2] += tl.sum()
        self.sums[-1] += valid.sum()

    def reduce_and_reset(self, all_reduce: Any) -> dict[str, float]:
        s = all_reduce(self.sums.clone()).cpu()
        self.sums.zero_()
        D, M = self.D, self.M
        out = {"loss": float(s[-2] / s[-1]) if s[-1] > 0 else float("nan")}
        for i, n in enumerate(self.directions):
            if s[D + i] > 0:
                out[f"loss/dir/{n}"] = float(s[i] / s[D + i])
        for i, n in enumerate(self.modalities):
            if s[2 * D + M + i] > 0:
                out[f"loss/mod/{n}"] = float(s[2 * D + i] / s[2 * D + M + i])
        return out


class Window:
    """Throughput counters between two log steps (this rank's)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.wait = self.gen_s = self.gen_tokens = 0.0
        self.tokens = self.real = self.steps = 0

    def add(self, wait: float, gen_s: float, gen_tokens: float, tokens: int, real: int) -> None:
        """One optimizer step: data wait and generation seconds, generated tokens, row slots
        processed and how many of them were not padding."""
        self.wait += wait
        self.gen_s += gen_s
        self.gen_tokens += gen_tokens
        self.tokens += tokens
        self.real += real
        self.steps += 1


def window_metrics(
    losses: dict[str, float],
    window: Window,
    *,
    sources: list[str],
    mix_tokens: list[int],
    lr: float,
    grad_norm: float,
    world: int,
    flops_per_token: float,
    peak_flops: float,
    tokens_seen: int,
    nan_skipped: int,
    read_errors: int,
    device: torch.device,
    overflow_dropped: int = 0,
) -> dict[str, Any]:
    """The metrics record of a log step (keys documented in README), from the losses reduced
    over ranks and this rank's window."""
    elapsed = time.perf_counter() - window.t0
    tok_s_dev = window.tokens / max(elapsed, 1e-9)
    m: dict[str, Any] = dict(losses)
    total_mix = sum(mix_tokens) or 1
    for name, n in zip(sources, mix_tokens):
        m[f"data/mix/{name}"] = n / total_mix
    m.update(
        {
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tok_s_dev * world,
            "tokens_per_s_per_device": tok_s_dev,
            "mfu": tok_s_dev * flops_per_token / peak_flops if peak_flops > 0 else 0.0,
            "data_wait_frac": window.wait / max(elapsed, 1e-9),
            "generation_share": window.gen_s / max(elapsed, 1e-9),
            "gen_tokens_per_s": window.gen_tokens / max(window.gen_s, 1e-9),
            "packing_efficiency": window.real / max(window.tokens, 1),
            "tokens_seen": tokens_seen,
            "step_time_s": elapsed / max(window.steps, 1),
            "nan_skipped": nan_skipped,
            "data_read_errors": read_errors,
            "data_overflow_dropped": overflow_dropped,
            "mem_rss_gb": rss_gb(),
        }
    )
    if device.type == "cuda":
        m["mem_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return m


def rss_gb() -> float:
    """This process's resident memory in GiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


class MetricsLogger:
    """Rank 0 writes metrics.jsonl and to wandb; other ranks are silent."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        wandb_mode: str,
        project: str,
        entity: str,
        run_name: str,
        config: dict[str, Any],
        wandb_id: str | None,
        progress: str,
        total_steps: int,
        start_step: int,
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb: Any = None
        self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
        self.bar: Any = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=project,
                entity=entity or None,
                name=run_name,
                id=self.wandb_id,
                resume="allow",
                mode=mode,  # type: ignore[arg-type]
                dir=str(run_dir),
                config=config,
            )
        show = progress == "always" or (progress == "auto" and sys.stderr.isatty())
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if "loss" not in metrics:  # a callback's record between log steps
            if self.bar is None:
                print(f"step {step} {metrics}", flush=True)
            return
        msg = (
            f"step {step} loss {metrics.get('loss', float('nan')):.4f} "
            f"lr {metrics.get('lr', 0):.2e} tok/s {metrics.get('tokens_per_s', 0):,.0f} "
            f"mfu {100 * metrics.get('mfu', 0):.2f}%"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
        else:
            print(msg, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def event(self, step: int, kind: str, **info: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "event": kind, **info}) + "\n")
            print(f"[loretta] step {step}: {kind} {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
