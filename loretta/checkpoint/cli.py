"""loretta-convert: the command line of the checkpoint package (tools/convert_checkpoint.py is
a wrapper).

    loretta-convert SRC DST --to {safetensors,loretta,hf} [--dtype bf16] [--shard-size 2GB]
    loretta-convert inspect SRC [--json] [--no-checksum]
    loretta-convert verify A B [--atol 0]

Exit status: 0 done (verify: match), 1 verify found differences, 2 an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from loretta.errors import CheckpointError, LorettaError

DTYPES = ("bf16", "fp32")


def _convert_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="loretta-convert",
        description="Convert loretta checkpoints: ZeRO-3 folder -> consolidated safetensors or "
        "Hugging Face Llama/Mistral, and back. Also: 'loretta-convert inspect SRC', "
        "'loretta-convert verify A B'.",
    )
    ap.add_argument("src", help="checkpoint step folder, run dir, consolidated or HF folder")
    ap.add_argument("dst", help="output folder (written beside it, renamed when complete)")
    ap.add_argument(
        "--to",
        required=True,
        choices=["safetensors", "loretta", "hf"],
        help="safetensors (= loretta): our names + config.yaml + layout.json; hf: transformers",
    )
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: the source's")
    ap.add_argument(
        "--shard-size", default="2GB", help="max bytes per safetensors file (2GB = 2e9, 1GiB)"
    )
    ap.add_argument("--step", type=int, default=None, help="step to convert (run/checkpoints dir)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ap.add_argument(
        "--layout",
        default=None,
        help="layout.json for an HF folder that has no loretta_layout.json",
    )
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="--to hf: the text modality's tokenizer.json (default: the one beside the "
        "training data, if any)",
    )
    ap.add_argument("--tokenizer-modality", default="text", help="the modality it tokenizes")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _inspect_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loretta-convert inspect")
    ap.add_argument("src")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-checksum", action="store_true", help="headers only (fast)")
    return ap


def _inspect(args_in: list[str]) -> int:
    from loretta.checkpoint.verify import inspect

    a = _inspect_parser().parse_args(args_in)
    report = inspect(a.src, a.step, checksums=not a.no_checksum)
    if a.json:
        print(json.dumps(report))
    else:
        _print_inspect(report)
    return 0


def _verify_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loretta-convert verify")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--atol", type=float, default=0.0, help="0: bitwise (default)")
    ap.add_argument("--step", type=int, default=None, help="step of A (run dir)")
    ap.add_argument("--json", action="store_true")
    return ap


def _verify(args_in: list[str]) -> int:
    from loretta.checkpoint.verify import verify

    a = _verify_parser().parse_args(args_in)
    report = verify(a.a, a.b, a.atol, a.step)
    if a.json:
        print(json.dumps(report))
    else:
        for p in report["problems"]:
            print(f"MISMATCH {p}")
        n = len(report["tensors"])
        verdict = "match" if report["match"] else "DIFFER"
        print(
            f"{verdict}: {report['kinds'][0]} {report['a']} vs {report['kinds'][1]} "
            f"{report['b']} ({n} tensors compared, atol={a.atol})"
        )
    return 0 if report["match"] else 1


def _convert(args_in: list[str]) -> int:
    from loretta.checkpoint.export import convert
    from loretta.units import parse_size

    a = _convert_parser().parse_args(args_in)
    try:
        shard = parse_size(a.shard_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    out = convert(
        a.src,
        a.dst,
        a.to,
        a.dtype,
        shard,
        a.step,
        a.overwrite,
        a.layout,
        False if a.no_progress else None,
        a.tokenizer,
        a.tokenizer_modality,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser that main() uses for these arguments (convert, inspect or verify: the first
    word picks one) and the arguments it parses; no side effects."""
    parsers = {"inspect": _inspect_parser, "verify": _verify_parser}
    if argv and argv[0] in parsers:
        return parsers[argv[0]](), argv[1:]
    return _convert_parser(), argv[1:] if argv and argv[0] == "convert" else argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"inspect": _inspect, "verify": _verify, "convert": _convert}
    cmd = argv[0] if argv and argv[0] in commands else "convert"
    args_in = argv[1:] if argv and argv[0] == cmd else argv
    try:
        return commands[cmd](args_in)
    except LorettaError as e:
        print(f"loretta-convert: error: {e}", file=sys.stderr)
        return 2


def _print_inspect(r: dict[str, Any]) -> None:
    head = {k: v for k, v in r.items() if k not in ("tensors",)}
    for k, v in head.items():
        print(f"{k}: {v}")
    width = max((len(t["name"]) for t in r["tensors"]), default=4)
    for t in r["tensors"]:
        shape = "x".join(str(s) for s in t["shape"])
        print(f"  {t['name']:<{width}}  {shape:>14}  {t['dtype']:<8}  {t.get('sha256', '')}")


if __name__ == "__main__":
    sys.exit(main())
