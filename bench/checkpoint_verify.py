"""What verifying a checkpoint before resuming costs: a checkpoint-shaped folder (rank files
of random bytes, like DeepSpeed's optimizer and model partitions) gets its manifest written,
then is checked in full (size + CRC-32 of every file, threads) and by size only.

    python bench/checkpoint_verify.py [--gb 4 --ranks 8] [--tiny] [--dir /path/on/the/real/fs]

The folder is written just before, so the full check reads from the page cache: the figure is
the checksum's speed (an upper bound for disk speed). On a cold cache the check runs at the
filesystem's read speed, since the threads keep several reads in flight. Last line: JSON with
verify_s, bytes, gb_per_s (and manifest_s, size_only_s, threads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from loretta.train import integrity


def make_folder(root: Path, total: int, ranks: int) -> Path:
    folder = root / "step_00000100"
    (folder / "ds" / "ds").mkdir(parents=True)
    (folder / "rng").mkdir()
    block = os.urandom(1 << 20)
    per_rank = total // ranks
    for r in range(ranks):
        for kind, share in (("optim_states", 0.75), ("model_states", 0.25)):
            f = folder / "ds" / "ds" / f"zero_pp_rank_{r}_mp_rank_00_{kind}.pt"
            left = int(per_rank * share)
            with open(f, "wb") as out:
                while left > 0:
                    n = min(left, len(block))
                    out.write(block[:n])
                    left -= n
        (folder / "rng" / f"rank_{r:05d}.safetensors").write_bytes(os.urandom(25_000))
    for name in ("state.json", "config.yaml", "layout.json"):
        (folder / name).write_text("{}\n")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=4.0, help="checkpoint size in GiB")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="64 MiB, 2 ranks (a smoke test)")
    ap.add_argument("--dir", default="", help="where to write (default: a temp folder)")
    a = ap.parse_args()
    total, ranks = (64 << 20, 2) if a.tiny else (int(a.gb * 2**30), a.ranks)
    root = Path(tempfile.mkdtemp(prefix="ckverify-", dir=a.dir or None))
    try:
        folder = make_folder(root, total, ranks)
        t0 = time.perf_counter()
        integrity.write_manifest(folder)
        manifest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        problems = integrity.verify(folder, full=True)
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        problems += integrity.verify(folder, full=False)
        size_s = time.perf_counter() - t0
        assert not problems, problems
        nbytes = integrity.total_bytes(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"verified {nbytes / 2**30:.2f} GiB in {verify_s:.2f}s ({ranks} ranks' files)")
    rec = {
        "verify_s": round(verify_s, 3),
        "bytes": nbytes,
        "gb_per_s": round(nbytes / 2**30 / max(verify_s, 1e-9), 2),
        "manifest_s": round(manifest_s, 3),
        "size_only_s": round(size_s, 4),
        "threads": integrity._workers(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
