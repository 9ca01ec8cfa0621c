"""Bench: our ZeRO-3 -> safetensors conversion against DeepSpeed's zero_to_fp32, same checkpoint.

    python bench/convert.py [--workdir DIR] [--repeats 3]      # 507M parameters (2 GB fp32)
    python bench/convert.py --tiny                              # seconds; what tests run

The checkpoint is real: one training step of `python -m loretta.pretrain` under torchrun with
one process (DeepSpeed ZeRO-3, fp32, Adam), saved by DeepSpeed's own save_checkpoint; built once
and cached in --workdir (about 8 GB at full size; `--clean` removes it at the end, the two
exports are always removed). Full size: dim 2048, 10 layers, 16 heads, vocabulary 192 = 506.8M
parameters (world size 1 keeps the build within a small machine's memory; the multi-rank
merge is covered by tests/test_convert.py against zero_to_fp32 at 2 and 3 ranks).

Each measurement is one fresh child process (this file with --child), the same for both sides:

    ours    loretta.checkpoint.export.convert(STEP, OUT, "safetensors", shard_size=5GB)
    theirs  deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(
                STEP, OUT, tag="ds", safe_serialization=True, max_shard_size="5GB")

The child imports everything first (torch, DeepSpeed or loretta), then times the conversion
alone with perf_counter, so imports are excluded on both sides; both exit normally. Peak RSS is
the child's ru_maxrss from os.wait4 (imports included, so it is conservative); the RSS after
imports is reported too. The rank files are read once beforehand so every run sees a warm page
cache; in each child an untimed warm-up conversion precedes the timed one (zero_to_fp32 imports
seconds of modules lazily); --repeats children per side, alternating; both report the median. The last line is one JSON object: time_ratio = ours / theirs (goal
<= 1.0), peak_rss_over_model_bytes = our peak RSS / fp32 model bytes (goal <= 1.5), params.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
FULL = {"model.dim": 2048, "model.n_layers": 10, "model.n_heads": 16, "model.n_kv_heads": 0}
TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 0}
SHARD = "5GB"  # zero_to_fp32's default max_shard_size; both sides write one file here


def env() -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        e["MASTER_PORT"] = str(s.getsockname()[1])
    return e


def build_checkpoint(work: Path, model: dict[str, int]) -> Path:
    """A real 1-process ZeRO-3 checkpoint (one step) of the bench model; reused when present."""
    import yaml

    from loretta.config import load_config
    from loretta.data.synthetic import ensure_synthetic
    from loretta.errors import DataError
    from loretta.train.checkpoint import latest_complete

    root = work / "run" / "checkpoints"
    found = latest_complete(root)
    if found is not None:
        have = yaml.safe_load((found / "config.yaml").read_text())["model"]
        if all(have[k.split(".")[1]] == v for k, v in model.items()):
            return found
        shutil.rmtree(work / "run")  # built for another model size
    syn = load_config("tiny").data.sources[0].synthetic
    assert syn is not None
    try:
        ensure_synthetic(work / "data", syn)
    except DataError:  # built by an older version of the synthetic recipe
        shutil.rmtree(work / "data")
        ensure_synthetic(work / "data", syn)
    over = {
        "run.run_dir": str(work / "run"),
        "run.steps": 1,
        "optim.warmup_steps": 1,
        **model,
        "data.seq_len": 64,
        "data.micro_batch_size": 1,
        "data.sources.0.path": str(work / "data"),
        "logging.wandb": "disabled",
        "logging.progress": "never",
    }
    e = env()
    cmd = [
        str(Path(PY).parent / "torchrun"),
        "--nproc_per_node=1",
        "--master_addr=127.0.0.1",
        f"--master_port={e['MASTER_PORT']}",
        "-m",
        "loretta.pretrain",
        "--config",
        "tiny",
        *[f"--{k}={v}" for k, v in over.items()],
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=e, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"building the checkpoint failed:\n{res.stderr[-4000:]}")
    print(f"built the checkpoint in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    found = latest_complete(root)
    assert found is not None
    return found


def child(side: str, step: str, out: str) -> None:
    """One timed conversion. An untimed conversion into OUT.warmup runs first in the same
    process: zero_to_fp32 imports several seconds of modules lazily (huggingface_hub's
    serialization, ...), and imports are excluded on both sides."""
    if side == "ours":
        from loretta.checkpoint.export import convert
        from loretta.units import parse_size

        shard = parse_size(SHARD)

        def run(dst: str) -> None:
            convert(step, dst, "safetensors", shard_size=shard, progress=False)

    else:
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

        def run(dst: str) -> None:
            convert_zero_checkpoint_to_fp32_state_dict(
                step, dst, max_shard_size=SHARD, safe_serialization=True, tag="ds"
            )

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run(out + ".warmup")
    shutil.rmtree(out + ".warmup")
    t0 = time.perf_counter()
    run(out)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rss_after_imports": rss_imports}))


def measure(side: str, step: Path, out: Path) -> dict[str, Any]:
    """Seconds of the conversion and peak RSS bytes of one child process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [PY, __file__, "--child", side, str(step), str(out)]
    proc = subprocess.Popen(
        cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-4000:]}")
    row: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    row["peak_rss"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return row


def same_tensors(a: Path, b: Path) -> bool:
    """Both outputs hold the same tensors bitwise (read one tensor at a time)."""
    import torch

    from loretta.checkpoint.io import SafetensorsFolder

    fa, fb = SafetensorsFolder(a), SafetensorsFolder(b)
    names = {i.name for i in fa.infos()}
    if names != {i.name for i in fb.infos()}:
        return False
    return all(torch.equal(fa.read(n), fb.read(n)) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--workdir", default=None, help="default /tmp/loretta-bench-convert[-tiny]")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per side (3; tiny 1)")
    ap.add_argument("--tiny", action="store_true", help="a 123K-parameter model: seconds")
    ap.add_argument(
        "--clean", action="store_true", help="remove the workdir (its checkpoint cache) at the end"
    )
    ap.add_argument("--child", nargs=3, metavar=("SIDE", "STEP", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    repeats = args.repeats or (1 if args.tiny else 3)
    work = Path(args.workdir or f"/tmp/loretta-bench-convert{'-tiny' if args.tiny else ''}")
    step = build_checkpoint(work, TINY if args.tiny else FULL)

    from loretta.checkpoint.hf import param_shapes
    from loretta.checkpoint.load import open_source

    with open_source(step) as src:
        cfg = src.model_cfg
    params = sum(math.prod(s) for s in param_shapes(cfg).values())
    model_bytes = 4 * params
    for f in (step / "ds").iterdir():  # warm the page cache for everyone
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    outs = {side: work / f"out_{side}" for side in ("ours", "theirs")}
    samples: dict[str, list[dict[str, Any]]] = {side: [] for side in outs}
    for i in range(repeats):
        for side in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
            samples[side].append(measure(side, step, outs[side]))
    equal = same_tensors(outs["ours"], outs["theirs"])
    for out in outs.values():  # two exports of the model: never left behind
        shutil.rmtree(out, ignore_errors=True)
    if args.clean:  # the checkpoint too (otherwise kept: the next run reuses it)
        shutil.rmtree(work, ignore_errors=True)

    def med(side: str, key: str) -> float:
        return float(statistics.median(r[key] for r in samples[side]))

    ours_s, theirs_s = med("ours", "seconds"), med("theirs", "seconds")
    ours_rss = max(r["peak_rss"] for r in samples["ours"])
    theirs_rss = max(r["peak_rss"] for r in samples["theirs"])
    result: dict[str, Any] = {
        "bench": "convert",
        "mode": "tiny" if args.tiny else "full",
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU",
        "checkpoint": str(step),
        "world_size": 1,
        "params": params,
        "model_bytes_fp32": model_bytes,
        "statistic": f"median of {repeats}, each after an in-process warm-up; imports excluded",
        "ours_s": round(ours_s, 3),
        "theirs_s": round(theirs_s, 3),
        "time_ratio": round(ours_s / theirs_s, 3),
        "ours_peak_rss_bytes": ours_rss,
        "theirs_peak_rss_bytes": theirs_rss,
        "ours_rss_after_imports_bytes": int(med("ours", "rss_after_imports")),
        "theirs_rss_after_imports_bytes": int(med("theirs", "rss_after_imports")),
        "peak_rss_over_model_bytes": round(ours_rss / model_bytes, 3),
        "theirs_peak_rss_over_model_bytes": round(theirs_rss / model_bytes, 3),
        "outputs_bitwise_equal": equal,
        "samples_s": {k: [round(r["seconds"], 3) for r in v] for k, v in samples.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
