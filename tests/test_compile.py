"""torch.compile'd blocks (model.compile) compute what the eager decoder computes, alone and in
a real ZeRO-3 training run on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import losses, tiny_overrides, torchrun

from loretta.model import Decoder, DecoderConfig
from loretta.model.generate import SamplingConfig, generate


def test_compile_mode_resolution() -> None:
    m = Decoder(DecoderConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2))
    assert m.compile_blocks("auto", torch.device("cpu")) is False
    assert all(b.compiled is None for b in m.layers)  # type: ignore[union-attr]
    assert m.compile_blocks(False) is False


@pytest.mark.slow
def test_compiled_blocks_equal_eager_forward_backward_and_decode() -> None:
    cfg = DecoderConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    eager, comp = Decoder(cfg), Decoder(cfg)
    comp.load_state_dict(eager.state_dict())
    assert comp.compile_blocks(True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 32), generator=g)
    tgt = torch.randint(0, 97, (2, 32), generator=g)
    doc = torch.cat([torch.zeros(2, 10, dtype=torch.long), torch.ones(2, 22, dtype=torch.long)], 1)
    pos = torch.cat([torch.arange(10), torch.arange(22)]).expand(2, 32)
    la = eager(ids, pos, doc, targets=tgt)
    lb = comp(ids, pos, doc, targets=tgt)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    la.mean().backward()
    lb.mean().backward()
    for (name, a), b in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    # KV-cache decoding bypasses the compiled bodies and samples the same tokens
    sc = SamplingConfig(max_new_tokens=5, temperature=0.0)
    prompts = [ids[0, :7], ids[1, :4]]
    assert torch.equal(generate(eager, prompts, sc)[0], generate(comp, prompts, sc)[0])


@pytest.mark.slow
def test_tiny_recipe_trains_compiled_under_zero3(tmp_path: Path, tiny_data: Path) -> None:
    """torchrun, one process, bf16-free ZeRO-3 on gloo: first losses equal eager's."""
    runs = {}
    for mode in ("false", "true"):
        over = tiny_overrides(tmp_path / mode, steps=3, data=tiny_data, **{"optim.warmup_steps": 1})
        torchrun(1, ["--config", "tiny", *over, f"--model.compile={mode}"], timeout=900)
        runs[mode] = losses(tmp_path / mode / "run")
    assert sorted(runs["true"]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(runs["true"][step] - runs["false"][step]) < 1e-4, runs
