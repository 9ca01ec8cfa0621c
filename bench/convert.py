"""Bench: our ZeRO-3 -> safetensors conversion against DeepSpeed's zero_to_fp32, same checkpoint.

    python bench/convert.py [--workdir DIR] [--repeats 3]

Builds once (cached in --workdir) a real 2-rank ZeRO-3 checkpoint of a ~114M-parameter decoder
(dim 768, 16 layers, tiny synthetic data) with one training step of `python -m loretta.pretrain`
under torchrun, then runs each converter in its own subprocess, alternating, --repeats times:

    ours    python tools/convert_checkpoint.py STEP OUT --to safetensors
    theirs  python -m deepspeed.utils.zero_to_fp32 STEP OUT -t ds --safe_serialization
    ours_hf python tools/convert_checkpoint.py STEP OUT --to hf            (for information)

Wall time includes interpreter start and imports (what a user waits for); peak RSS is the
child's ru_maxrss from os.wait4. The rank files are read once beforehand so every run sees a
warm page cache. Times are the best of the repeats.

Importing the CUDA build of torch alone peaks at ~540 MB RSS, and at ~690 MB with a normal
interpreter exit (C++ static destructors); our wrapper exits with os._exit once its files are
fsynced, zero_to_fp32 exits normally. Both import-only baselines are reported (they vary by some
30 MB from run to run with what the page cache holds). The last line is one JSON object:
time_ratio = ours / theirs (target <= 1.0), peak_rss_over_model_bytes = our peak RSS / fp32
model bytes (target <= 1.5), plus the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MODEL = {"model.dim": 768, "model.n_layers": 16, "model.n_heads": 12, "model.n_kv_heads": 0}


def env() -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        e["MASTER_PORT"] = str(s.getsockname()[1])
    return e


def build_checkpoint(work: Path) -> Path:
    """A real 2-rank ZeRO-3 checkpoint (one step) of the bench model; reused when present."""
    import yaml

    from loretta.config import load_config
    from loretta.data.synthetic import ensure_synthetic
    from loretta.errors import DataError
    from loretta.train.checkpoint import latest_complete

    root = work / "run" / "checkpoints"
    found = latest_complete(root)
    if found is not None:
        model = yaml.safe_load((found / "config.yaml").read_text())["model"]
        if all(model[k.split(".")[1]] == v for k, v in MODEL.items()):
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
        **MODEL,
        "data.seq_len": 64,
        "data.micro_batch_size": 1,
        "data.sources.0.path": str(work / "data"),
        "logging.wandb": "disabled",
        "logging.progress": "never",
    }
    e = env()
    cmd = [
        str(Path(PY).parent / "torchrun"),
        "--nproc_per_node=2",
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


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def same_tensors(a: Path, b: Path) -> bool:
    """Both outputs hold the same tensors bitwise (read one tensor at a time)."""
    import torch

    from loretta.convert import SafetensorsFolder

    fa, fb = SafetensorsFolder(a), SafetensorsFolder(b)
    names = {i.name for i in fa.infos()}
    if names != {i.name for i in fb.infos()}:
        return False
    return all(torch.equal(fa.read(n), fb.read(n)) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/loretta-bench-convert")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir)
    step = build_checkpoint(work)

    from loretta.convert import open_source, param_shapes

    with open_source(step) as src:
        cfg = src.model_cfg
    params = sum(math.prod(s) for s in param_shapes(cfg).values())
    model_bytes = 4 * params
    for f in (step / "ds").iterdir():  # warm the page cache for everyone
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    outs = {k: work / f"out_{k}" for k in ("ours", "theirs", "ours_hf")}
    cmds = {
        "theirs": [
            PY,
            "-m",
            "deepspeed.utils.zero_to_fp32",
            str(step),
            str(outs["theirs"]),
            "-t",
            "ds",
            "--safe_serialization",
        ],
        "ours": [
            PY,
            str(REPO / "tools" / "convert_checkpoint.py"),
            str(step),
            str(outs["ours"]),
            "--to",
            "safetensors",
            "--no-progress",
        ],
        "ours_hf": [
            PY,
            str(REPO / "tools" / "convert_checkpoint.py"),
            str(step),
            str(outs["ours_hf"]),
            "--to",
            "hf",
            "--no-progress",
        ],
    }
    samples: dict[str, list[tuple[float, int]]] = {k: [] for k in cmds}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            samples[name].append(measure(cmd))
    equal = same_tensors(outs["ours"], outs["theirs"])
    # what importing torch alone costs (the CUDA build), with a normal and with a fast exit
    import_rss = measure([PY, "-c", "import loretta.convert"])[1]
    import_fast_rss = measure([PY, "-c", "import os, loretta.convert; os._exit(0)"])[1]

    def best(name: str) -> tuple[float, int]:
        return min(s[0] for s in samples[name]), max(s[1] for s in samples[name])

    (ours_s, ours_rss), (theirs_s, theirs_rss), (hf_s, hf_rss) = (
        best("ours"),
        best("theirs"),
        best("ours_hf"),
    )
    result: dict[str, Any] = {
        "bench": "convert",
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU",
        "checkpoint": str(step),
        "world_size": 2,
        "params": params,
        "model_bytes_fp32": model_bytes,
        "ours_s": round(ours_s, 3),
        "theirs_s": round(theirs_s, 3),
        "time_ratio": round(ours_s / theirs_s, 3),
        "ours_peak_rss_bytes": ours_rss,
        "theirs_peak_rss_bytes": theirs_rss,
        "peak_rss_over_model_bytes": round(ours_rss / model_bytes, 3),
        "theirs_peak_rss_over_model_bytes": round(theirs_rss / model_bytes, 3),
        "import_only_peak_rss_bytes": import_rss,
        "import_only_fast_exit_peak_rss_bytes": import_fast_rss,
        "ours_hf_s": round(hf_s, 3),
        "ours_hf_peak_rss_bytes": hf_rss,
        "outputs_bitwise_equal": equal,
        "repeats": args.repeats,
        "samples_s": {k: [round(s[0], 3) for s in v] for k, v in samples.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
