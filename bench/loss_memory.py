"""Peak memory and time of the training loss, today's versus the fused chunked one, on the CPU.

    today: logits = h @ W.T (N, V) -> .float() -> F.cross_entropy(reduction="none")
    fused: loretta.train.loss.linear_cross_entropy(h, W, targets, "chunked")

Both run forward + backward of mean(per-token loss over valid tokens), from the final hidden
states h (N = batch x seq, d) and the output weight W (V, d), with IGNORE targets present.

How memory is measured: each side runs in a fresh subprocess. After the inputs exist (and
before the first forward) the child reads its resident set size (/proc/self/statm); after the
warm-up and the timed repeats it reads the peak resident set size (getrusage ru_maxrss). The
difference is the most memory the loss needed on top of its inputs: torch's CPU allocator
takes every large tensor (far above glibc's 32 MiB mmap ceiling) from mmap and gives it back on
free, so the resident set follows the live tensors; small allocations are noise at this size.
Gradients of h and W are set to None after each repeat, so every repeat allocates them anew.

Time: median of `--repeats` forward+backward runs after `--warmup` runs, same for both sides;
with `--rounds` R the two sides alternate R times (today, fused, today, ...) and each side's
time is the median over its rounds, so that load from other processes on a shared machine
weighs on both alike; peak memory is the largest over rounds.
Last line JSON: peak_mem_ratio = fused / today (goal <= 0.5), time_ratio = fused / today
(goal <= 1.1), with each side's figures.
    python bench/loss_memory.py            # V 32000, 8 x 2048 tokens, d 512
    python bench/loss_memory.py --tiny     # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(a: argparse.Namespace) -> None:
    import torch

    from loretta.train.loss import IGNORE, cross_entropy_per_token, linear_cross_entropy

    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    N = a.batch * a.seq
    h = (torch.randn(N, a.dim) / a.dim**0.5).to(dtype).requires_grad_()
    w = (torch.randn(a.vocab, a.dim) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, a.vocab, (N,))
    targets[:: a.seq // 8] = IGNORE  # some ignored tokens, as in packed rows
    n_valid = (targets != IGNORE).sum()

    def step() -> float:
        if a.side == "today":
            logits = (h @ w.t()).view(a.batch, a.seq, a.vocab)
            tl = cross_entropy_per_token(logits, targets.view(a.batch, a.seq))
        else:
            tl = linear_cross_entropy(h, w, targets, "chunked", a.chunk)
        loss = tl.sum() / n_valid
        loss.backward()
        h.grad = w.grad = None
        return float(loss)

    base = rss_bytes()
    times, loss = [], 0.0
    for i in range(a.warmup + a.repeats):
        t0 = time.perf_counter()
        loss = step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "side": a.side,
                "peak_delta_mb": (peak - base) / 2**20,
                "time_s": statistics.median(times),
                "loss": loss,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: automatic)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two sides R times")
    ap.add_argument("--tiny", action="store_true", help="V 4096, 2 x 512 tokens, d 64")
    ap.add_argument("--side", choices=["today", "fused"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tiny:
        a.vocab, a.batch, a.seq, a.dim, a.repeats = 4096, 2, 512, 64, 2
    if a.side:
        child(a)
        return
    args = [
        f"--vocab={a.vocab}",
        f"--batch={a.batch}",
        f"--seq={a.seq}",
        f"--dim={a.dim}",
        f"--dtype={a.dtype}",
        f"--chunk={a.chunk}",
        f"--warmup={a.warmup}",
        f"--repeats={a.repeats}",
    ]
    runs: dict[str, list[dict[str, float]]] = {"today": [], "fused": []}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for _ in range(a.rounds):
        for side in ("today", "fused"):
            r = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *args, f"--side={side}"],
                capture_output=True,
                text=True,
                env=env,
            )
            if r.returncode != 0:
                sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
            runs[side].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[side][-1]), flush=True)
    t, f = (
        {
            "peak_delta_mb": max(x["peak_delta_mb"] for x in runs[side]),
            "time_s": statistics.median(x["time_s"] for x in runs[side]),
            "loss": runs[side][-1]["loss"],
        }
        for side in ("today", "fused")
    )
    print(
        json.dumps(
            {
                "peak_mem_ratio": f["peak_delta_mb"] / max(t["peak_delta_mb"], 1e-9),
                "time_ratio": f["time_s"] / max(t["time_s"], 1e-9),
                "today_peak_mb": t["peak_delta_mb"],
                "fused_peak_mb": f["peak_delta_mb"],
                "today_time_s": t["time_s"],
                "fused_time_s": f["time_s"],
                "max_abs_loss_diff": abs(t["loss"] - f["loss"]),
                "shape": {"tokens": a.batch * a.seq, "vocab": a.vocab, "dim": a.dim},
                "dtype": a.dtype,
                "rounds": a.rounds,
                "device": "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
