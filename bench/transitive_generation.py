"""Generated tokens/s for a transitive batch under ZeRO-3 (two CPU processes, or the GPUs), three
paths measured alike (one warm-up each, then --repeats rounds taking the paths in turn, median):

    naive     ZeRO-3 hooks gather every layer on every forward, no KV cache (whole prefix again)
    hooks_kv  ZeRO-3 hooks gather every layer on every forward, KV-cached decoding
    once_kv   ours: every weight gathered once per generate call, KV-cached decoding

plus the share of a transitive training step's wall time spent generating. Last line: JSON with
"ratio" = once_kv / hooks_kv tokens/s (what gathering once buys over the honest baseline, target
>= 10), "ratio_vs_naive" = once_kv / naive (gathering once and the KV cache together), and
"gen_share". Also timed alike: host_kv (once_kv with the sampler that ran before sampling moved
onto the device: one device->host copy and sync per token) as "before" for the GPU check's
gen_tokens_per_s, and with --compile-decode the compiled decode step (static KV cache, CUDA
graphs on CUDA).

    python bench/transitive_generation.py [--dim 128 --layers 4 --prompts 16 --new 196]
    python bench/transitive_generation.py --device cuda --dim 1024 --layers 8   # one process/GPU
    python bench/transitive_generation.py --tiny                                # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(out: Path, a: argparse.Namespace, overrides: list[str]) -> None:
    import torch

    from loretta.config import load_config
    from loretta.data.loader import build_loader
    from loretta.dist import discover
    from loretta.model.generate import SamplingConfig, generate
    from loretta.train.trainer import prepare

    cfg = load_config("tiny_loretta", overrides)
    info = discover()
    p = prepare(cfg, info)
    from loretta import engine as E

    E.init_distributed(info, "nccl" if p.device.type == "cuda" else "gloo", 600)
    eng = E.build_engine(cfg, p.ds_config, cfg.run.seed)
    eng.module.set_backend(cfg.model.attn_backend, p.device)
    lay = p.layout
    c = lay["c"]
    g = torch.Generator().manual_seed(info.rank)
    prompts = [
        torch.randint(lay["b"].offset, lay["b"].stop, (12,), generator=g) for _ in range(a.prompts)
    ]
    sc = SamplingConfig(max_new_tokens=a.new, allowed=(c.offset, c.stop))
    n_tokens = a.prompts * a.new * info.world_size

    def timed(fn):  # type: ignore[no-untyped-def]
        E.barrier()
        t = time.perf_counter()
        fn()
        E.barrier()
        return time.perf_counter() - t

    import loretta.model.generate as G

    device_sample = G._sample

    def sample_on_host(logits, cfg, gen, t=0, masks=None, row_keys=None, cols=None):  # type: ignore[no-untyped-def]
        # the sampler before this change: multinomial on the host, a sync per token
        logits = G._restrict(logits.float(), cfg, t, masks)
        probs = torch.softmax(logits, dim=-1)
        out = torch.multinomial(probs.cpu(), 1, generator=torch.Generator()).squeeze(-1)
        return out.to(logits.device)

    keys = list(range(len(prompts)))  # keyed, batching-invariant sampling, as training samples

    def run(path: str) -> None:
        gen = torch.Generator().manual_seed(0)
        if path in ("once_kv", "host_kv", "compiled"):
            G._sample = sample_on_host if path == "host_kv" else device_sample
            try:
                with eng.generation("once") as fwd:
                    generate(
                        eng.module,
                        prompts,
                        sc,
                        gen,
                        use_cache=True,
                        fixed_steps=True,
                        forward=fwd,
                        compile_step=path == "compiled",
                        row_keys=keys,
                    )
            finally:
                G._sample = device_sample
        else:  # the module's own ZeRO-3 hooks fetch every layer for every forward
            use_cache = path == "hooks_kv"
            generate(
                eng.module, prompts, sc, gen, use_cache=use_cache, fixed_steps=True, row_keys=keys
            )

    paths: tuple[str, ...] = ("naive", "hooks_kv", "once_kv", "host_kv")
    if a.compile_decode:
        paths += ("compiled",)
    for path in paths:  # the same warm-up for every path
        run(path)
    times: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(a.repeats):  # in turn, so that drift on a shared machine hits all alike
        for path in paths:
            times[path].append(timed(lambda path=path: run(path)))
    median = {path: statistics.median(ts) for path, ts in times.items()}

    # a transitive training step: generation (prepare) + forward/backward/step, with the
    # configured decoding and, with --compile-decode, with compiled decode steps as well
    def step_share(objective):  # type: ignore[no-untyped-def]
        loader, _ = build_loader(cfg, info.rank, info.world_size, None, objective.planner_factory())
        it = iter(loader)
        gen_s = step_s = 0.0
        # untimed warm-up steps first: compiled blocks (model.compile, on by default on CUDA)
        # recompile once for a symbolic max_seqlen, and that must not count as either part
        warm = 3
        for i in range(warm + a.steps):
            batch = next(it)
            E.barrier()
            t0 = time.perf_counter()
            batch = objective.prepare(batch, eng, i)
            batch = {k: v.to(eng.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            t1 = time.perf_counter()
            tl = eng(
                batch["tokens"], batch["positions"], batch["doc_ids"], targets=batch["targets"]
            )
            loss = tl.sum() / (batch["targets"] != -100).sum()
            eng.backward(loss)
            eng.step()
            E.barrier()
            t2 = time.perf_counter()
            if i >= warm:
                gen_s += t1 - t0
                step_s += t2 - t0
        return gen_s / step_s, step_s / a.steps

    share, step_time = step_share(p.objective)
    share_c = step_c = None
    if a.compile_decode:
        from loretta.transitive import build as build_objective

        gen_cfg = dataclasses.replace(cfg.objective.generation, compile_decode=True)
        objective = dataclasses.replace(cfg.objective, generation=gen_cfg)
        ccfg = dataclasses.replace(cfg, objective=objective)
        share_c, step_c = step_share(build_objective(ccfg, lay))
    if info.rank == 0:
        (out / "result.json").write_text(
            json.dumps(
                {
                    **{f"{path}_tokens_per_s": n_tokens / t for path, t in median.items()},
                    **{f"{path}_s": t for path, t in median.items()},
                    # the GPU check's names: before (host sampling) and after (on the device)
                    "ours_tokens_per_s": n_tokens / median["once_kv"],
                    "host_tokens_per_s": n_tokens / median["host_kv"],
                    "compiled_tokens_per_s": (
                        n_tokens / median["compiled"] if "compiled" in median else None
                    ),
                    "generation_share": share,
                    "step_s": step_time,
                    "generation_share_compiled": share_c,
                    "step_s_compiled": step_c,
                }
            )
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=196)  # an SVL-digits image: 14x14 tokens
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per path (median)")
    ap.add_argument("--nproc", type=int, default=2, help="CPU processes (ZeRO-3 world size)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--compile-decode", action="store_true", help="also time compiled decode")
    ap.add_argument("--worker", default="")
    a, rest = ap.parse_known_args()
    if a.worker:
        worker(Path(a.worker), a, rest)
        return
    if a.tiny:
        a.dim, a.layers, a.prompts, a.new, a.steps, a.repeats, a.nproc = 32, 1, 2, 8, 2, 1, 1
    tmp = Path(tempfile.mkdtemp(prefix="transgen-"))
    overrides = [
        f"--model.dim={a.dim}",
        f"--model.n_layers={a.layers}",
        "--model.n_heads=4",
        f"--data.sources.0.path=synthetic:{tmp / 'ab'}",
        f"--data.sources.1.path=synthetic:{tmp / 'bc'}",
        f"--run.run_dir={tmp / 'run'}",
        "--logging.wandb=disabled",
    ]
    if a.tiny:  # fewer synthetic samples to write (the training steps need a few rows only)
        overrides += [f"--data.sources.{i}.synthetic.samples=300" for i in (0, 1)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nproc = a.nproc
    if a.device == "cuda":  # one process per GPU (at most 2), bf16
        import torch

        nproc = min(2, torch.cuda.device_count())
        overrides += ["--run.device=cuda", "--run.precision=bf16"]
        env.pop("DS_ACCELERATOR", None)
    else:
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        __file__,
        "--worker",
        str(tmp),
        "--dim",
        str(a.dim),
        "--layers",
        str(a.layers),
        "--prompts",
        str(a.prompts),
        "--new",
        str(a.new),
        "--steps",
        str(a.steps),
        "--repeats",
        str(a.repeats),
        "--device",
        a.device,
        *(["--compile-decode"] if a.compile_decode else []),
        *overrides,
    ]
    try:  # the synthetic shards and checkpoints are this run's alone: never left in /tmp
        res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(
                f"worker failed (exit {res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-5000:]}"
            )
        r = json.loads((tmp / "result.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for path in ("naive", "hooks_kv", "once_kv"):
        print(
            f"{path:>8}: {r[f'{path}_tokens_per_s']:9.1f} generated tokens/s ({r[f'{path}_s']:.2f}s)"
        )
    print(
        f"transitive training step: {r['step_s']:.3f}s, {100 * r['generation_share']:.1f}% generating"
    )
    print(
        json.dumps(
            {
                "ratio": round(r["once_kv_tokens_per_s"] / r["hooks_kv_tokens_per_s"], 2),
                "ratio_vs_naive": round(r["once_kv_tokens_per_s"] / r["naive_tokens_per_s"], 2),
                "gen_share": round(r["generation_share"], 4),
                "generation_share": round(r["generation_share"], 4),  # gpu_summary's name
                **{
                    f"{path}_tokens_per_s": round(r[f"{path}_tokens_per_s"], 1)
                    for path in ("naive", "hooks_kv", "once_kv", "host_kv")
                },
                # before (host sampling) / after (on the device) / compiled decode, for the GPU check
                "host_tokens_per_s": round(r["host_tokens_per_s"], 1),
                "ours_tokens_per_s": round(r["ours_tokens_per_s"], 1),
                "compiled_tokens_per_s": r["compiled_tokens_per_s"],
                # the same training steps with compiled decode steps (--compile-decode)
                "gen_share_compiled": r["generation_share_compiled"],
                "step_s": round(r["step_s"], 4),
                "step_s_compiled": r["step_s_compiled"],
                "repeats": a.repeats,
                "statistic": "median",
                "world_size": nproc,
                "device": _device_name(a.device),
            }
        )
    )


if __name__ == "__main__":
    main()
