"""Forward+backward time of our decoder vs transformers' LlamaForCausalLM (same config, batch,
dtype and weights), in one process on the CPU. Last line: JSON with "ratio" = ours / theirs."""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import transformers

    from loretta.model import Decoder, DecoderConfig
    from loretta.model.hf import hf_config, to_hf

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    cfg = DecoderConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        attn_backend="sdpa",
    )
    ours = Decoder(cfg)
    ours.set_backend("auto", dev)
    hc = {
        k: v
        for k, v in hf_config(cfg).items()
        if k not in ("architectures", "model_type", "torch_dtype")
    }
    theirs = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hc, attn_implementation="sdpa")
    )
    sd = {}
    for n, t in ours.state_dict().items():
        sd.update(dict(to_hf(n, t, cfg)))
    theirs.load_state_dict(sd, strict=True)
    ours, theirs = ours.to(dev, dtype).train(), theirs.to(dev, dtype).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)

    def step_ours() -> None:
        logits = ours(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()

    def step_theirs() -> None:
        logits = theirs(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()

    def timed(fn: object) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up
        step_ours(), step_theirs()
    a, b = [], []
    for _ in range(args.iters):  # interleave so drift affects both equally
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        a.append(timed(step_ours))
        b.append(timed(step_theirs))
    # the minimum is the least noisy estimate of a step on a shared machine
    t_ours, t_theirs = min(a), min(b)
    tokens = args.batch * args.seq
    print(f"ours   {1000 * t_ours:8.1f} ms/step  {tokens / t_ours:10.0f} tokens/s")
    print(
        f"theirs {1000 * t_theirs:8.1f} ms/step  {tokens / t_theirs:10.0f} tokens/s  (transformers {transformers.__version__})"
    )
    print(
        json.dumps(
            {
                "ratio": round(t_ours / t_theirs, 4),
                "ours_ms": round(1000 * t_ours, 2),
                "theirs_ms": round(1000 * t_theirs, 2),
                "tokens": tokens,
                "device": str(dev),
                "dtype": args.dtype,
                "params": sum(p.numel() for p in ours.parameters()),
            }
        )
    )


if __name__ == "__main__":
    main()
