"""convert(): any checkpoint folder -> a consolidated folder (our names) or a Hugging Face
folder, planned from the headers, written shard by shard into a temporary folder beside DST
and renamed into place when complete (an interrupted conversion leaves nothing at DST)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from loretta.checkpoint.hf import hf_config, split_to_hf
from loretta.checkpoint.io import ShardedWriter, TensorInfo
from loretta.checkpoint.load import open_source
from loretta.checkpoint.source import Source
from loretta.checkpoint.tokenizer import (
    build_tokenizer_json,
    find_text_tokenizer,
    write_tokenizer,
)
from loretta.data.format import fsync_dir, replace_dir
from loretta.errors import CheckpointError

OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("safetensors", "loretta", "hf")


def _progress(total: int, desc: str, enabled: bool | None) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        disable=None if enabled is None else not enabled,
        file=sys.stderr,
    )


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    dtype: str | None = None,
    shard_size: int = 2 * 10**9,
    step: int | None = None,
    overwrite: bool = False,
    layout: str | Path | None = None,
    progress: bool | None = None,
    tokenizer: str | Path | None = None,
    tokenizer_modality: str = "text",
) -> Path:
    """Convert SRC (any format) to DST: 'safetensors'/'loretta' (consolidated, our names) or
    'hf'. dtype None keeps the source dtype (fp32 for ZeRO master weights). `tokenizer` is the
    text modality's tokenizer.json for the HF export (default: the one stored with the
    training data, if any)."""
    dst = Path(dst)
    if to not in FORMATS:
        raise CheckpointError(f"--to {to!r}: choose safetensors (= loretta) or hf")
    if dtype is not None and dtype not in OUT_DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {sorted(OUT_DTYPES)}")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise CheckpointError(f"--tokenizer {tokenizer}: no such file")
    with open_source(src, step, layout) as source:
        if source.layout is None:
            raise CheckpointError(
                f"{source.path}: no vocabulary layout ({source.layout_file} missing); pass "
                "--layout layout.json (the one the model was trained with)"
            )
        if dst.resolve() == source.path.resolve():
            raise CheckpointError(f"{dst}: the destination is the source folder")
        cfg, hf = source.model_cfg, to == "hf"
        out_dtype = OUT_DTYPES[dtype] if dtype else None
        plan: list[TensorInfo] = []
        for info in source.our_infos():
            dt = out_dtype or info.dtype
            meta_t = torch.empty(info.shape, device="meta")
            pieces = split_to_hf(info.name, meta_t, cfg) if hf else [(info.name, meta_t)]
            plan += [TensorInfo(n, tuple(p.shape), dt) for n, p in pieces]
        tok_json: dict[str, Any] = {}
        if hf:  # built (and checked) before any weight is written
            text_tok = Path(tokenizer) if tokenizer else None
            if text_tok is None and tokenizer_modality in source.layout:
                text_tok = find_text_tokenizer(source.train_config)
            tok_json = build_tokenizer_json(
                source.layout, cfg.vocab_size, text_tok, tokenizer_modality
            )
        meta = {"format": "pt", "loretta": "hf" if hf else "consolidated", "source": source.kind}
        meta.update({k: str(v) for k, v in source.info.items()})
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        writer = ShardedWriter(tmp, plan, shard_size, meta)
        try:
            with _progress(writer.total_bytes, f"{source.kind} -> {to}", progress) as bar:
                for name, t in source.iter_ours():
                    t = t.to(out_dtype) if out_dtype else t
                    for piece_name, piece in split_to_hf(name, t, cfg) if hf else [(name, t)]:
                        writer.write(piece_name, piece)
                    bar.update(t.numel() * t.element_size())
            writer.close()
            _write_side_files(tmp, source, hf, out_dtype or plan[0].dtype, tok_json)
            fsync_dir(tmp)
            if (dst.exists() or dst.is_symlink()) and not overwrite:
                raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
            replace_dir(tmp, dst)
        except BaseException:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dst


def _write_side_files(
    folder: Path, source: Source, hf: bool, dtype: torch.dtype, tok_json: dict[str, Any]
) -> None:
    layout = source.layout
    assert layout is not None
    layout_json = json.dumps(layout.to_dict(), indent=1) + "\n"
    config_yaml = (
        source.config_file.read_text()
        if source.config_file is not None and source.config_file.suffix == ".yaml"
        else yaml.safe_dump(source.train_config, sort_keys=False)
    )
    if not hf:
        (folder / "config.yaml").write_text(config_yaml)
        (folder / "layout.json").write_text(layout_json)
        return
    data = source.train_config.get("data")
    seq_len = data.get("seq_len") if isinstance(data, dict) else None
    max_pos = int(seq_len) if isinstance(seq_len, int) else 2048
    config = hf_config(source.model_cfg, layout, dtype, max_pos)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {
        "bos_token_id": layout.bos_id,
        "eos_token_id": layout.eos_id,
        "pad_token_id": layout.pad_id,
    }
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (folder / "loretta_config.yaml").write_text(config_yaml)
    (folder / "loretta_layout.json").write_text(layout_json)
    write_tokenizer(folder, tok_json, layout, max_pos)
