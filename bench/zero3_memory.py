"""Per-rank bytes of ZeRO-3 partitioned parameters + optimizer state at world sizes 1, 2, 4 on
the CPU (real DeepSpeed over gloo). Last line: JSON with "max_ratio_to_ideal" = worst per-rank
bytes / (world-1 total / N), over N in {2, 4}. Target <= 1.05.

    python bench/zero3_memory.py [--dim 512 --layers 8 --vocab 16384]
    python bench/zero3_memory.py --tiny      # a small model at world sizes 1 and 2 (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(out: Path, overrides: list[str]) -> None:
    """Runs under torchrun: build the engine from the tiny recipe + overrides, take one step."""
    import torch

    from loretta.config import load_config
    from loretta.dist import discover
    from loretta.train.trainer import prepare

    cfg = load_config("tiny", overrides)
    info = discover()
    p = prepare(cfg, info)
    from loretta import engine as E

    E.init_distributed(info, "gloo", 600)
    eng = E.build_engine(cfg, p.ds_config, cfg.run.seed)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch_size, cfg.data.seq_len))
    loss = eng(ids).float().logsumexp(-1).mean()  # any scalar: we only need optimizer state
    eng.backward(loss)
    eng.step()
    rec = {"rank": info.rank, **eng.partition_bytes()}
    (out / f"rank{info.rank}.json").write_text(json.dumps(rec))
    E.barrier()


def measure_worlds(
    tmp: Path, worlds: list[int], overrides: list[str], env: dict[str, str]
) -> dict[int, list[dict[str, int]]]:
    """Per-rank byte counts of one launch per world size."""
    results: dict[int, list[dict[str, int]]] = {}
    for n in worlds:
        out = tmp / f"w{n}"
        out.mkdir()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={n}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            __file__,
            "--worker",
            str(out),
            *overrides,
        ]
        subprocess.run(cmd, env=env, check=True, cwd=REPO, capture_output=True)
        results[n] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--worlds", default="1,2,4", help="world sizes; the first must be 1")
    ap.add_argument("--tiny", action="store_true", help="a small, quick smoke run (tests)")
    ap.add_argument("--worker", default="")
    args, rest = ap.parse_known_args()
    if args.worker:
        worker(Path(args.worker), rest)
        return
    if args.tiny:
        args.dim, args.layers, args.heads, args.worlds = 64, 2, 4, "1,2"
    worlds = [int(n) for n in args.worlds.split(",")]
    assert worlds[0] == 1 and len(worlds) >= 2, f"--worlds={args.worlds}: 1 first, then others"
    tmp = Path(tempfile.mkdtemp(prefix="zero3mem-"))
    overrides = [
        f"--model.dim={args.dim}",
        f"--model.n_layers={args.layers}",
        f"--model.n_heads={args.heads}",
        f"--model.n_kv_heads={args.heads // 2}",
        "--data.seq_len=64",
        "--data.micro_batch_size=2",
        f"--data.sources.0.path=synthetic:{tmp / 'data'}",
        f"--run.run_dir={tmp / 'run'}",
    ]
    if args.tiny:  # the data only feeds prepare(): a few shards are enough
        overrides += ["--data.sources.0.synthetic.samples=200"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    try:  # the synthetic shards and runs are this bench's alone: never left in /tmp
        results = measure_worlds(tmp, worlds, overrides, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(r["params"] + r["optimizer"] for r in results[1])
    ratios = {}
    for n in worlds[1:]:
        per_rank = [r["params"] + r["optimizer"] for r in results[n]]
        ratios[n] = max(per_rank) / (total / n)
        print(f"world {n}: per-rank bytes {per_rank} ideal {total / n:.0f} ratio {ratios[n]:.4f}")
    print(f"world 1: total bytes {total} (params + fp32 master + Adam moments)")
    print(
        json.dumps(
            {
                "max_ratio_to_ideal": round(max(ratios.values()), 4),
                **{f"ratio_world{n}": round(r, 4) for n, r in ratios.items()},
                "total_bytes_world1": total,
                "per_rank_bytes": {
                    str(n): [r["params"] + r["optimizer"] for r in results[n]] for n in results
                },
            }
        )
    )


if __name__ == "__main__":
    main()
