"""Entry point: ``python -m loretta.pretrain --config tiny [--section.field=value ...]``.

Works under torchrun, the deepspeed launcher and SLURM srun, or as a single process.
"""

from __future__ import annotations

import argparse
import sys

from loretta.errors import LorettaError


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (no side effects); unknown --section.field=value are overrides."""
    ap = argparse.ArgumentParser(
        prog="loretta-pretrain",
        description="Pretrain a LoReTTa decoder with DeepSpeed ZeRO-3. Any --section.field=value "
        "overrides the config (e.g. --optim.lr=3e-4 --run.steps=100).",
    )
    ap.add_argument("--config", default="tiny", help="recipe name (tiny, ...) or YAML path")
    ap.add_argument("--resume", default=None, help="none | auto | checkpoint folder")
    ap.add_argument("--dry-run", action="store_true", help="check config, data and one batch")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    return build_parser().parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    # Catch SIGTERM/SIGUSR1 from the start: one that arrives while DeepSpeed initialises is
    # acted on at the first step boundary instead of killing the process.
    from loretta.train.faults import SignalFlag

    signals = SignalFlag()
    from loretta.config import load_config
    from loretta.dist import discover

    try:
        if args.resume is not None:
            overrides.append(f"--checkpoint.resume={args.resume}")
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(cfg.to_yaml())
            return 0
        info = discover(argv=argv)
        from loretta.train.trainer import run

        return run(cfg, info, dry_run=args.dry_run, signals=signals)
    except LorettaError as e:
        print(f"loretta: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
