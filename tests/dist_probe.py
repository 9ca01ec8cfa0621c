"""Run under torchrun: build the real ZeRO-3 engine and dump what each rank holds, and which
F.linear a generation block runs with.

torchrun --nproc_per_node 2 tests/dist_probe.py OUT_DIR [overrides...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from loretta.config import load_config
from loretta.dist import discover
from loretta.train.trainer import prepare


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config("tiny", sys.argv[2:])
    info = discover()
    p = prepare(cfg, info)
    from loretta import engine as E

    E.init_distributed(info, "gloo", 120)
    eng = E.build_engine(cfg, p.ds_config, cfg.run.seed)
    params = {
        name: {"numel": int(prm.ds_numel), "local": int(prm.ds_tensor.numel())}
        for name, prm in eng.module.named_parameters()
    }
    import torch
    import torch.nn.functional as F

    ds_linear = F.linear  # ZeRO-3's memory-efficient linear, installed by the engine
    ids = torch.randint(0, cfg.model.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    coord = eng.ds.optimizer.parameter_offload.get_param_coordinator()

    def train_step() -> None:
        eng.backward(eng(ids, targets=ids).mean())
        eng.step()

    for _ in range(3):  # ZeRO-3 records its fetch trace, then completes it
        train_step()
    trace_before = coord.is_complete_trace()
    with torch.no_grad(), eng.generation("once") as fwd:
        torch_inside = F.linear is torch._C._nn.linear
        plain = fwd(ids)
        F.linear = ds_linear  # the same forward through DeepSpeed's linear
        try:
            through_ds = fwd(ids)
        finally:
            F.linear = torch._C._nn.linear
    trace_after_generation = coord.is_complete_trace()
    train_step()
    rec = {
        # (complete before, after a generation block, after the next step): prefetch survives
        "trace_complete": [trace_before, trace_after_generation, coord.is_complete_trace()],
        "rank": info.rank,
        "world": info.world_size,
        "params": params,
        "bytes": eng.partition_bytes(),
        "ds_linear_before": ds_linear.__module__,
        "torch_linear_in_generation": torch_inside,
        "ds_linear_after": F.linear is ds_linear,
        "same_logits": bool(torch.equal(plain, through_ds)),
    }
    (out / f"rank{info.rank}.json").write_text(json.dumps(rec))
    E.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
