"""`loretta-demo`: the built-in default job (README's first command).

Builds the synthetic two-modality dataset (cached), pretrains the `tiny` model with DeepSpeed
ZeRO-3 on this machine (2 CPU processes, or every GPU), printing loss and throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loretta.launch import default_nproc, torchrun_pretrain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loretta-demo", description=__doc__)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--nproc", type=int, default=0, help="processes (0: 2 on CPU, one per GPU)")
    args, overrides = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    code = torchrun_pretrain(args.config, overrides, args.nproc or default_nproc())
    if code != 0:
        return code
    from loretta.config import load_config

    cfg = load_config(args.config, overrides)
    rows = [json.loads(x) for x in (cfg.run.path / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in rows if "loss" in r and "event" not in r]
    if logs:
        first, last = logs[0], logs[-1]
        print(
            f"\n[loretta-demo] done: loss {first['loss']:.3f} (step {first['step']}) -> "
            f"{last['loss']:.3f} (step {last['step']}), {last['tokens_per_s']:,.0f} tokens/s; "
            f"checkpoint: {Path(cfg.run.path) / 'checkpoints'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
