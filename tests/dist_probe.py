"""Run under torchrun: build the real ZeRO-3 engine and dump what each rank holds.

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
    rec = {
        "rank": info.rank,
        "world": info.world_size,
        "params": params,
        "bytes": eng.partition_bytes(),
    }
    (out / f"rank{info.rank}.json").write_text(json.dumps(rec))
    E.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
