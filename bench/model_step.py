"""Forward+backward time of our decoder vs transformers' LlamaForCausalLM (same config, batch,
dtype and weights), in one process on the CPU, for two kinds of rows:

    unpacked  one sequence per row (plain causal attention)
    packed    rows of several documents, as training packs them: ours gets doc_ids and positions
              that restart per document; theirs the same positions and the equivalent 4-D
              block-diagonal causal mask (the logits of the two are checked to agree)

Last line: JSON with "ratio" = ours / theirs (unpacked), "packed_ratio" = ours / theirs (packed).

    python bench/model_step.py [--dim 256 --layers 4 --seq 256 --batch 8]
    python bench/model_step.py --tiny          # seconds: a smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def packed_rows(
    batch: int, seq: int, docs: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, positions), each (batch, seq): rows cut into documents of random lengths
    (about `docs` per row, seeded), positions restarting at 0 in every document."""
    g = torch.Generator().manual_seed(1)
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    positions = torch.zeros(batch, seq, dtype=torch.long)
    for r in range(batch):
        cuts = torch.randperm(seq - 1, generator=g)[: max(0, docs - 1)] + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values])
        for d, (lo, hi) in enumerate(zip(starts.tolist(), [*starts[1:].tolist(), seq])):
            doc_ids[r, lo:hi] = d
            positions[r, lo:hi] = torch.arange(hi - lo)
    return doc_ids.to(device), positions.to(device)


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
    ap.add_argument("--docs", type=int, default=4, help="documents per packed row (mean)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    args = ap.parse_args()
    if args.tiny:
        args.dim, args.layers, args.heads, args.kv_heads = 32, 1, 2, 1
        args.vocab, args.batch, args.seq, args.iters = 256, 2, 32, 2

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
    ours = ours.to(dev, dtype).train()
    theirs = theirs.to(dev, dtype).train()  # type: ignore[arg-type]  # transformers' .to stub
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)

    doc_ids, positions = packed_rows(args.batch, args.seq, args.docs, dev)
    # True = may attend: causal and inside the query's own document, (B, 1, T, T)
    causal = torch.ones(args.seq, args.seq, dtype=torch.bool, device=dev).tril()
    mask4d = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())

    steps = {
        "unpacked": (lambda: loss(ours(ids)), lambda: loss(theirs(input_ids=ids).logits)),
        "packed": (
            lambda: loss(ours(ids, positions, doc_ids)),
            lambda: loss(
                theirs(input_ids=ids, position_ids=positions, attention_mask=mask4d).logits
            ),
        ),
    }
    with torch.no_grad():  # the packed inputs mean the same to both models
        gap = (
            ours(ids, positions, doc_ids).float()
            - theirs(ids, position_ids=positions, attention_mask=mask4d).logits.float()
        )
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        assert gap.abs().max() < tol, f"packed logits differ by {gap.abs().max():.2e}"

    def timed(fn: object) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn().backward()  # type: ignore[operator]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    best: dict[str, tuple[float, float]] = {}
    for kind, (step_ours, step_theirs) in steps.items():
        for _ in range(2):  # warm-up
            timed(step_ours), timed(step_theirs)
        a, b = [], []
        for _ in range(args.iters):  # interleave so drift affects both equally
            ours.zero_grad(set_to_none=True)
            theirs.zero_grad(set_to_none=True)
            a.append(timed(step_ours))
            b.append(timed(step_theirs))
        # the minimum is the least noisy estimate of a step on a shared machine
        best[kind] = (min(a), min(b))
    tokens = args.batch * args.seq
    for kind, (t_ours, t_theirs) in best.items():
        print(f"{kind:>8} ours   {1000 * t_ours:8.1f} ms/step  {tokens / t_ours:10.0f} tokens/s")
        print(
            f"{kind:>8} theirs {1000 * t_theirs:8.1f} ms/step  {tokens / t_theirs:10.0f} tokens/s  "
            f"(transformers {transformers.__version__})"
        )
    (t_ours, t_theirs), (p_ours, p_theirs) = best["unpacked"], best["packed"]
    print(
        json.dumps(
            {
                "ratio": round(t_ours / t_theirs, 4),
                "ours_ms": round(1000 * t_ours, 2),
                "theirs_ms": round(1000 * t_theirs, 2),
                "packed_ratio": round(p_ours / p_theirs, 4),
                "packed_ours_ms": round(1000 * p_ours, 2),
                "packed_theirs_ms": round(1000 * p_theirs, 2),
                "docs_per_row": round(float((doc_ids.amax(1) + 1).float().mean()), 2),
                "tokens": tokens,
                "device": str(dev),
                "dtype": args.dtype,
                "params": sum(p.numel() for p in ours.parameters()),
            }
        )
    )


if __name__ == "__main__":
    main()
