"""inspect (every tensor's name, shape, dtype and checksum) and verify (two checkpoints of any
formats compared tensor by tensor, bitwise by default)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from loretta.checkpoint.hf import ARCH_FIELDS, ARCH_FIELDS_ALL, arch_diffs, hf_shapes, param_shapes
from loretta.checkpoint.io import tensor_digest
from loretta.checkpoint.load import open_source


def inspect(path: str | Path, step: int | None = None, checksums: bool = True) -> dict[str, Any]:
    """Metadata and every tensor (name, shape, dtype, sha256) of a checkpoint of any format, in
    the format's own names, listed in model order."""
    with open_source(path, step) as src:
        tensors = []
        stream = src.iter_raw() if checksums else ((i.name, None) for i in src.raw_infos())
        infos = {i.name: i for i in src.raw_infos()}
        for name, t in stream:
            row: dict[str, Any] = {
                "name": name,
                "shape": list(infos[name].shape),
                "dtype": str(infos[name].dtype).removeprefix("torch."),
            }
            if t is not None:
                row["sha256"] = tensor_digest(t)
            tensors.append(row)
        # list in model order whatever the storage order (ZeRO stores by parameter group)
        names = hf_shapes(src.model_cfg) if src.kind == "hf" else param_shapes(src.model_cfg)
        rank = {n: i for i, n in enumerate(names)}
        tensors.sort(key=lambda r: rank.get(r["name"], len(rank)))
        return {
            "path": str(src.path),
            "kind": src.kind,
            **src.info,
            "model": {k: getattr(src.model_cfg, k) for k in ARCH_FIELDS_ALL},
            "layout": src.layout.names if src.layout else None,
            "params": sum(math.prod(r["shape"]) for r in tensors),
            "tensors": tensors,
        }


def verify(
    a: str | Path, b: str | Path, atol: float = 0.0, step: int | None = None
) -> dict[str, Any]:
    """Compare two checkpoints of any formats tensor by tensor, in our parameter names. atol 0
    means bitwise equal (values and dtype); otherwise max |a - b| <= atol in fp32."""
    with open_source(a, step) as sa, open_source(b) as sb:
        problems: list[str] = []
        if sa.layout and sb.layout and sa.layout != sb.layout:
            problems.append("vocabulary layouts differ")
        problems += arch_diffs(sa.model_cfg, sb.model_cfg, (*ARCH_FIELDS, "tie_embeddings"))
        infos_b = {i.name: i for i in sb.our_infos()}
        names_a = [i.name for i in sa.our_infos()]
        problems += [f"{n}: only in {b}" for n in infos_b if n not in names_a]
        rows = []
        for name, ta in sa.iter_ours():
            if name not in infos_b:
                problems.append(f"{name}: only in {a}")
                continue
            tb = sb.read_ours(name)
            if ta.shape != tb.shape:
                problems.append(f"{name}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
                continue
            diff = (ta.float() - tb.float()).abs().max().item() if ta.numel() else 0.0
            same = ta.dtype == tb.dtype and torch.equal(ta, tb)
            ok = same if atol == 0 else diff <= atol
            rows.append({"name": name, "max_abs_diff": diff, "bitwise_equal": same, "ok": ok})
            if not ok:
                problems.append(
                    f"{name}: max |a-b| = {diff:.3g}"
                    + ("" if ta.dtype == tb.dtype else f" ({ta.dtype} vs {tb.dtype})")
                )
        return {
            "a": str(sa.path),
            "b": str(sb.path),
            "kinds": [sa.kind, sb.kind],
            "match": not problems,
            "problems": problems,
            "tensors": rows,
        }
