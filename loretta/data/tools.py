"""`loretta-shards`: create, inspect, verify and convert datasets (tools/shards.py is a wrapper).
This module is the command line: argument parsing and one small function per command; the work
is done by loretta/data/{shards,mds_convert,inputs,verify}.py.

    loretta-shards layout layout.json --modality image=256 --modality text=32000 --fixed image=784
    loretta-shards write samples/ data/pairs --layout layout.json --shard-size 64MB --workers 4
    loretta-shards index data/tars --layout layout.json     # .tar, .tar.gz, or a plain MDS folder
    loretta-shards inspect data/pairs -n 3           # a dataset folder or URL, or one .tar shard
    loretta-shards verify data/pairs
    loretta-shards to-mds data/pairs data/pairs-mds
    loretta-shards from-mds data/pairs-mds data/pairs-again
    loretta-shards synth data/synth --samples 1000 --modality a=64 --modality b=64:8-32

Sizes (--shard-size) follow loretta/units.py: 64MB = 64,000,000 bytes, 64MiB = 64 * 2**20.
Exit codes: 0 done, 1 `verify` found problems, 2 bad input (the message names the file, field
and value, and the fix).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loretta.data.format import atomic_write_json, check_ids, parse_npy, split_member
from loretta.data.inputs import open_input, sample_bytes
from loretta.data.remote import is_url
from loretta.data.shards import COMPRESSED_TARS
from loretta.data.verify import verify_dataset
from loretta.errors import DataError, LorettaError
from loretta.units import parse_size
from loretta.vocab import VocabLayout

PROG = "loretta-shards"


# ==== argument parsing helpers =================================================================
def parse_modality(text: str, with_lengths: bool = False) -> tuple[str, int, tuple[int, int]]:
    """'image=256' -> ('image', 256, (0, 0)); with lengths also 'a=64:8-32' -> (8, 32)."""
    pattern = r"([A-Za-z_]\w*)=(\d+)" + (r"(?::(\d+)-(\d+))?" if with_lengths else "")
    m = re.fullmatch(pattern, text.strip())
    if not m:
        example = "a=64 or a=64:8-32 (size, then min-max tokens)" if with_lengths else "image=256"
        raise DataError(f"--modality {text!r}: expected NAME=SIZE, e.g. {example}")
    lens = (0, 0)
    if with_lengths and m.group(3) is not None:
        lens = (int(m.group(3)), int(m.group(4)))
    return m.group(1), int(m.group(2)), lens


def load_layout(path: str) -> VocabLayout:
    """A layout from layout.json, a dataset's manifest.json, or a folder holding either."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("layout.json", "manifest.json") if (p / n).exists()]
        if not found:
            raise DataError(
                f"--layout {path}: the folder has neither layout.json nor manifest.json; create "
                f"a layout with `{PROG} layout layout.json --modality NAME=SIZE ...`"
            )
        p = found[0]
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(
            f"--layout {path}: file not found; create it with "
            f"`{PROG} layout {path} --modality NAME=SIZE ...`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"--layout {p}: not valid JSON ({e})") from e
    if isinstance(d, dict) and isinstance(d.get("layout"), dict):
        d = d["layout"]  # a manifest
    if not isinstance(d, dict):
        raise DataError(f"--layout {p}: expected a JSON object, got {type(d).__name__}")
    return VocabLayout.from_dict(d, str(p))


def describe_layout(layout: VocabLayout) -> str:
    parts = [
        f"{m.name}: {m.token}={m.token_id}, ids [{m.offset}, {m.stop}) ({m.size}"
        + (f", fixed length {m.fixed_length})" if m.fixed_length is not None else ")")
        for m in layout.modalities
    ]
    return f"vocab {layout.size} ids; pad {layout.pad_id}, bos {layout.bos_id}, eos " + (
        f"{layout.eos_id} | " + " | ".join(parts)
    )


# ==== subcommands ==============================================================================
def cmd_layout(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise DataError(f"{out} already exists; choose another file or pass --overwrite")
    sizes: dict[str, int] = {}
    for text in a.modality or []:
        name, size, _ = parse_modality(text)
        if name in sizes:
            raise DataError(f"--modality {text!r}: modality {name!r} is given twice")
        sizes[name] = size
    if not sizes:
        raise DataError(
            "layout: give at least one --modality NAME=SIZE, e.g. --modality text=32000"
        )
    fixed: dict[str, int] = {}
    for text in a.fixed or []:
        name, n, _ = parse_modality(text)
        if name not in sizes:
            raise DataError(
                f"--fixed {text!r}: {name!r} is not one of the --modality names {list(sizes)}"
            )
        if n < 1:
            raise DataError(f"--fixed {text!r}: the fixed length must be >= 1")
        fixed[name] = n
    layout = VocabLayout.build(sizes, fixed_lengths=fixed)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, layout.to_dict())
    print(f"wrote {out}: {describe_layout(layout)}")
    return 0


def cmd_write(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from loretta.data.shards import write_dataset

    layout = load_layout(a.layout)
    if a.workers < 1:
        raise DataError(f"--workers={a.workers}: must be >= 1")
    samples, total = open_input(Path(a.input), a.format, layout)
    if a.samples_per_shard is not None:
        if a.samples_per_shard < 1:
            raise DataError(f"--samples-per-shard={a.samples_per_shard}: must be >= 1")
        per_shard = a.samples_per_shard
    else:
        try:
            target = parse_size(a.shard_size, "--shard-size")
        except ValueError as e:
            raise DataError(str(e)) from None
        head = list(itertools.islice(samples, 256))  # estimate bytes per sample from these
        if not head:
            raise DataError(f"{a.input}: no samples to write")
        mean = sum(map(sample_bytes, head)) / len(head)
        per_shard = max(1, int(target // mean))
        samples = itertools.chain(head, samples)
        print(
            f"--shard-size {a.shard_size}: ~{mean / 1024:.1f} KiB per sample -> {per_shard} "
            "samples per shard",
            file=sys.stderr,
        )
    bar = tqdm(samples, total=total, unit="samples", desc="write", disable=a.quiet)
    m = write_dataset(
        bar,
        a.out,
        layout,
        samples_per_shard=per_shard,
        workers=a.workers,
        overwrite=a.overwrite,
        meta={"input": str(a.input)},
    )
    print(f"wrote {a.out}: {m.summary()}")
    return 0


def cmd_index(a: argparse.Namespace) -> int:
    folder = Path(a.folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of .tar shards or MDS files")
    meta: dict[str, Any] = {}
    if a.layout is None:  # re-index: keep the layout and metadata of the existing manifest
        if not (folder / "manifest.json").exists():
            raise DataError(
                f"{folder} has no manifest.json to take the layout from; pass --layout "
                f"layout.json (create one with `{PROG} layout`)"
            )
        layout = load_layout(str(folder / "manifest.json"))
        with contextlib.suppress(ValueError, OSError):
            meta = dict(json.loads((folder / "manifest.json").read_text()).get("meta") or {})
    else:
        layout = load_layout(a.layout)
    tars = [p for p in folder.iterdir() if p.name.endswith((".tar", *COMPRESSED_TARS))]
    if (folder / "index.json").exists() and not tars:
        from loretta.data.mds_convert import adopt_mds

        meta.pop("adopted_mds", None)
        m = adopt_mds(folder, layout, meta=meta, progress=not a.quiet)
        print(f"adopted MDS folder {folder}: {m.summary()}; every array checked")
        return 0
    from loretta.data.shards import index_dataset

    m = index_dataset(folder, layout, meta=meta)
    gz = m.meta.get("decompressed") or {}
    note = f" ({len(gz)} compressed tars decompressed beside them)" if gz else ""
    print(f"indexed {folder}: {m.summary()}{note}; every array checked against the layout")
    return 0


def _ids(arr: np.ndarray, k: int = 8) -> str:
    head = " ".join(str(int(x)) for x in arr[:k])
    return f"[{head}{' ...' if arr.size > k else ''}]"


def cmd_inspect(a: argparse.Namespace) -> int:
    p = str(a.path)
    if not is_url(p) and p.endswith((".tar", *COMPRESSED_TARS)) and Path(p).is_file():
        return _inspect_tar(Path(p), a.n)
    from loretta.data.sources import open_dataset

    ds = open_dataset(p, a.cache_dir)
    m = ds.manifest
    print(f"dataset  {p}  ({m.format}, {m.summary()})")
    print(f"layout   {describe_layout(ds.layout)}")
    present = (ds.lengths > 0).mean(axis=0)
    for j, name in enumerate(ds.layout.names):
        col = ds.lengths[:, j]
        has = col[col > 0]
        mean = has.mean() if has.size else 0.0
        print(
            f"  {name:<8} in {present[j]:6.1%} of samples, {mean:8.1f} tokens on average, "
            f"max {int(col.max()):,}"
        )
    names = [s.name for s in m.shards]
    print(f"shards   {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    if m.meta:
        print(f"meta     {json.dumps(m.meta)[:200]}")
    for i in range(min(a.n, len(ds))):
        arrays = ds.read(i)
        print(f"[{i}] {ds.where(i)}")
        for name in ds.layout.names:
            if name in arrays:
                arr = arrays[name]
                print(f"    {name:<8} {arr.size:6d} tokens {arr.dtype}  {_ids(arr)}")
            else:
                print(f"    {name:<8} (absent)")
        print(f"    meta     {json.dumps(ds.meta(i))[:200]}")
    return 0


def _inspect_tar(path: Path, n: int) -> int:
    """First samples of one tar, with or without a manifest next to it."""
    import tarfile

    layout = None
    if (path.parent / "manifest.json").exists():
        layout = load_layout(str(path.parent / "manifest.json"))
        print(f"layout   {describe_layout(layout)}  (from {path.parent / 'manifest.json'})")
    samples: dict[str, list[str]] = {}
    count, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tf:  # plain or compressed
            for member in tf:
                if not member.isfile():
                    continue
                key, fld = split_member(member.name)
                if key != last:  # a sample's members are consecutive in a webdataset tar
                    count, last = count + 1, key
                    if len(samples) < n:
                        samples[key] = []
                if key not in samples:
                    continue  # past the first n samples: only count them
                lines = samples[key]
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if fld.endswith(".npy"):
                    arr = parse_npy(data, f"{path}: {member.name}")
                    mod = fld[: -len(".npy")]
                    if layout is not None and mod in layout:
                        check_ids(arr, layout[mod].size, f"{path}: sample {key!r} {mod}")
                    lines.append(f"    {mod:<8} {arr.size:6d} tokens {arr.dtype}  {_ids(arr)}")
                elif fld == "json":
                    lines.append(f"    meta     {data.decode(errors='replace')[:200]}")
                else:
                    lines.append(f"    {fld:<8} {len(data)} bytes (not a token array)")
    except tarfile.TarError as e:
        raise DataError(
            f"{path}: not a readable tar ({e}); the shard is truncated or corrupt"
        ) from e
    print(f"shard    {path}: {count} samples, {path.stat().st_size:,} bytes")
    for k, (key, lines) in enumerate(samples.items()):
        print(f"[{k}] {key!r}")
        print("\n".join(lines))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    summary, problems = verify_dataset(str(a.path), a.cache_dir)
    if problems:
        print(f"FAILED {summary}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"OK {summary}; checksums, index and every array verified")
    return 0


def cmd_to_mds(a: argparse.Namespace) -> int:
    from loretta.data.mds_convert import to_mds

    m = to_mds(
        a.src,
        a.dst,
        samples_per_shard=a.samples_per_shard,
        compression=a.compression,
        workers=a.workers,
        overwrite=a.overwrite,
        cache_dir=a.cache_dir,
        progress=not a.quiet,
    )
    print(f"wrote {a.dst} (MDS): {m.summary()}")
    return 0


def cmd_from_mds(a: argparse.Namespace) -> int:
    from loretta.data.mds_convert import from_mds

    m = from_mds(
        a.src,
        a.dst,
        samples_per_shard=a.samples_per_shard,
        workers=a.workers,
        overwrite=a.overwrite,
        cache_dir=a.cache_dir,
        progress=not a.quiet,
    )
    print(f"wrote {a.dst}: {m.summary()}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from loretta.config import SyntheticConfig, SynthModality
    from loretta.configlib import to_dict
    from loretta.data.shards import write_dataset
    from loretta.data.synthetic import synthetic_layout, synthetic_samples

    mods: dict[str, SynthModality] = {}
    for text in a.modality or []:
        name, size, (lo, hi) = parse_modality(text, with_lengths=True)
        lo, hi = (lo, hi) if hi else (a.min_len, a.max_len)
        if name in mods:
            raise DataError(f"--modality {text!r}: modality {name!r} is given twice")
        if size < 1 or not 1 <= lo <= hi:
            raise DataError(f"--modality {text!r}: need size >= 1 and 1 <= min <= max tokens")
        mods[name] = SynthModality(size=size, min_len=lo, max_len=hi)
    if not mods:
        raise DataError("synth: give at least one --modality NAME=SIZE[:MIN-MAX], e.g. a=64:8-32")
    for flag, v in (
        ("--samples", a.samples),
        ("--classes", a.classes),
        ("--samples-per-shard", a.samples_per_shard),
        ("--workers", a.workers),
    ):
        if v < 1:
            raise DataError(f"{flag}={v}: must be >= 1")
    cfg = SyntheticConfig(
        samples=a.samples,
        classes=a.classes,
        seed=a.seed,
        modalities=mods,
        samples_per_shard=a.samples_per_shard,
    )
    m = write_dataset(
        synthetic_samples(cfg),
        a.out,
        synthetic_layout(cfg),
        cfg.samples_per_shard,
        workers=a.workers,
        overwrite=a.overwrite,
        meta={"synthetic": to_dict(cfg)},  # what ensure_synthetic compares against
        progress=not a.quiet,
    )
    print(f"wrote {a.out}: {m.summary()}")
    return 0


# ==== entry point ==============================================================================
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Create, inspect, verify and convert loretta datasets (webdataset tars "
        "with manifest.json + index.npy, or MDS).",
        epilog="Exit codes: 0 done, 1 verify found problems, 2 bad input. See docs/data.md.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = add("layout", cmd_layout, "create a vocabulary layout file (layout.json)")
    p.add_argument("out", help="the layout file to write, e.g. layout.json")
    p.add_argument(
        "--modality",
        action="append",
        metavar="NAME=SIZE",
        help="a modality and its number of ids (repeat; order = id order)",
    )
    p.add_argument(
        "--fixed",
        action="append",
        metavar="NAME=LENGTH",
        help="a modality whose samples all have this many tokens",
    )
    p.add_argument("--overwrite", action="store_true")

    p = add("write", cmd_write, "write pre-tokenized samples (.npz / .npy / JSON lines) as shards")
    p.add_argument("input", help="a folder of .npz or {key}.{modality}.npy files, or JSON lines")
    p.add_argument("out", help="the dataset folder to create")
    p.add_argument(
        "--layout",
        required=True,
        help="layout.json (or a dataset folder / manifest.json to copy it from)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default="64MB", help="target shard size (default 64MB)")
    size.add_argument("--samples-per-shard", type=int, help="exact samples per shard instead")
    p.add_argument("--format", default="auto", choices=["auto", "npz", "npy", "jsonl"])
    p.add_argument("--workers", type=int, default=1, help="processes encoding shards")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add(
        "index",
        cmd_index,
        "write manifest + index for existing webdataset tars (.tar, .tar.gz: decompressed "
        "beside them) or for an MDS folder written by a plain MDSWriter",
    )
    p.add_argument("folder")
    p.add_argument(
        "--layout", help="layout.json (default: the layout of the folder's existing manifest)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (MDS folders)")

    p = add("inspect", cmd_inspect, "print the manifest summary and the first samples")
    p.add_argument("path", help="a dataset folder or URL (webdataset or MDS), or one .tar shard")
    p.add_argument("-n", type=int, default=3, help="samples to print (default 3)")
    p.add_argument("--cache-dir", default="", help="local copies of remote files")

    p = add("verify", cmd_verify, "recompute checksums; compare manifest, shards and index")
    p.add_argument("path", help="a dataset folder or URL (webdataset or MDS)")
    p.add_argument("--cache-dir", default="", help="local copies of remote files")

    for name, fn, what in (
        ("to-mds", cmd_to_mds, "convert a webdataset dataset to MDS (mosaicml-streaming)"),
        ("from-mds", cmd_from_mds, "convert an MDS dataset back to webdataset shards"),
    ):
        p = add(name, fn, what)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--samples-per-shard", type=int, help="default: keep the source's shards")
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--cache-dir", default="", help="local copies of remote files")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "to-mds":
            p.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")

    p = add("synth", cmd_synth, "write the synthetic class-conditioned dataset (tests, demos)")
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument(
        "--modality",
        action="append",
        metavar="NAME=SIZE[:MIN-MAX]",
        help="e.g. a=64 or a=64:8-32 (repeat)",
    )
    p.add_argument("--min-len", type=int, default=8, help="default min tokens per modality")
    p.add_argument("--max-len", type=int, default=32, help="default max tokens per modality")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `loretta-shards inspect ... | head`
        return 0
    except (LorettaError, OSError) as e:
        print(f"{PROG} {args.cmd}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
