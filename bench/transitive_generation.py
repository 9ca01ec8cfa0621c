"""Generated tokens/s for a transitive batch under ZeRO-3 (two CPU processes, or the GPUs):
naive (ZeRO-3 hooks gather every layer on every forward, no KV cache) vs host-sampled (weights
gathered once, KV-cached, but each token sampled on the host: one device->host copy and sync per
token, as before sampling moved onto the device) vs ours (gathered once, KV-cached, sampled on the
device), in one run; plus the share of a transitive training step's wall time spent generating.
Last line: JSON with "ratio" (ours / naive, target >= 10), "generation_share",
"host_tokens_per_s" (before) and "ours_tokens_per_s" (after).

    python bench/transitive_generation.py [--dim 128 --layers 4 --prompts 16 --new 196]
    python bench/transitive_generation.py --device cuda --dim 1024 --layers 8   # one process/GPU
"""

from __future__ import annotations

import argparse
import json
import os
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
    from loretta.train.loop import prepare

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

    def naive() -> None:  # the module's ZeRO-3 hooks fetch every layer for every forward
        generate(
            eng.module,
            prompts,
            sc,
            torch.Generator().manual_seed(0),
            use_cache=False,
            fixed_steps=True,
        )

    def ours() -> None:
        with eng.generation("once") as fwd:
            generate(
                eng.module,
                prompts,
                sc,
                torch.Generator().manual_seed(0),
                use_cache=True,
                fixed_steps=True,
                forward=fwd,
            )

    def compiled() -> None:  # ours, decode steps compiled (CUDA graphs), static KV cache
        with eng.generation("once") as fwd:
            generate(
                eng.module,
                prompts,
                sc,
                torch.Generator().manual_seed(0),
                use_cache=True,
                fixed_steps=True,
                forward=fwd,
                compile_step=True,
            )

    def host_sampled() -> None:  # the sampler before this change: multinomial on the host
        import loretta.model.generate as G

        cpu_gen = torch.Generator().manual_seed(0)
        device_sample = G._sample

        def sample_on_host(logits, cfg, gen, t=0, masks=None):  # type: ignore[no-untyped-def]
            logits = G._restrict(logits.float(), cfg, t, masks)
            probs = torch.softmax(logits, dim=-1)
            out = torch.multinomial(probs.cpu(), 1, generator=cpu_gen).squeeze(-1)
            return out.to(logits.device)

        G._sample = sample_on_host
        try:
            ours()
        finally:
            G._sample = device_sample

    ours()  # warm-up
    t_ours = min(timed(ours) for _ in range(3))
    t_host = min(timed(host_sampled) for _ in range(2))
    t_naive = timed(naive)
    t_comp = 0.0
    if a.compile_decode:
        compiled()  # warm-up: compilation and CUDA graph capture
        t_comp = min(timed(compiled) for _ in range(3))

    # a transitive training step: generation (prepare) + forward/backward/step
    loader, _ = build_loader(cfg, info.rank, info.world_size, None, p.objective.planner_factory())
    it = iter(loader)
    gen_s = step_s = 0.0
    for i in range(a.steps):
        batch = next(it)
        E.barrier()
        t0 = time.perf_counter()
        batch = p.objective.prepare(batch, eng, i)
        batch = {k: v.to(eng.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        t1 = time.perf_counter()
        tl = eng(batch["tokens"], batch["positions"], batch["doc_ids"], targets=batch["targets"])
        loss = tl.sum() / (batch["targets"] != -100).sum()
        eng.backward(loss)
        eng.step()
        E.barrier()
        t2 = time.perf_counter()
        if i > 0:  # skip the first (warm-up) step
            gen_s += t1 - t0
            step_s += t2 - t0
    if info.rank == 0:
        (out / "result.json").write_text(
            json.dumps(
                {
                    "naive_tokens_per_s": n_tokens / t_naive,
                    "ours_tokens_per_s": n_tokens / t_ours,
                    "host_tokens_per_s": n_tokens / t_host,
                    "compiled_tokens_per_s": n_tokens / t_comp if t_comp else None,
                    "naive_s": t_naive,
                    "ours_s": t_ours,
                    "generation_share": gen_s / step_s,
                    "step_s": step_s / (a.steps - 1),
                }
            )
        )


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
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--compile-decode", action="store_true", help="also time compiled decode")
    ap.add_argument("--worker", default="")
    a, rest = ap.parse_known_args()
    if a.worker:
        worker(Path(a.worker), a, rest)
        return
    tmp = Path(tempfile.mkdtemp(prefix="transgen-"))
    overrides = [
        f"--model.dim={a.dim}",
        f"--model.n_layers={a.layers}",
        "--model.n_heads=4",
        f"--data.sources.0.path={tmp / 'ab'}",
        f"--data.sources.1.path={tmp / 'bc'}",
        f"--run.run_dir={tmp / 'run'}",
        "--logging.wandb=disabled",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nproc = 2
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
        "--master_port=29811",
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
        "--device",
        a.device,
        *(["--compile-decode"] if a.compile_decode else []),
        *overrides,
    ]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(
            f"worker failed (exit {res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-5000:]}"
        )
    r = json.loads((tmp / "result.json").read_text())
    print(f"naive: {r['naive_tokens_per_s']:9.1f} generated tokens/s ({r['naive_s']:.2f}s)")
    print(f"host:  {r['host_tokens_per_s']:9.1f} generated tokens/s (host sampling, before)")
    print(f"ours:  {r['ours_tokens_per_s']:9.1f} generated tokens/s ({r['ours_s']:.2f}s)")
    print(
        f"transitive training step: {r['step_s']:.3f}s, {100 * r['generation_share']:.1f}% generating"
    )
    print(
        json.dumps(
            {
                "ratio": round(r["ours_tokens_per_s"] / r["naive_tokens_per_s"], 2),
                "generation_share": round(r["generation_share"], 4),
                "ours_tokens_per_s": round(r["ours_tokens_per_s"], 1),
                "naive_tokens_per_s": round(r["naive_tokens_per_s"], 1),
                "host_tokens_per_s": round(r["host_tokens_per_s"], 1),
                "compiled_tokens_per_s": r["compiled_tokens_per_s"]
                and round(r["compiled_tokens_per_s"], 1),
                "world_size": nproc,
                "device": _device_name(a.device),
            }
        )
    )


if __name__ == "__main__":
    main()
