"""Batched, KV-cached sampling restricted to one modality's id range.

Prompts of different lengths are left-padded; pad slots form their own document so that real
tokens never attend to them, and positions start at 0 at each prompt's first real token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loretta.model.decoder import Decoder, KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int
    allowed: tuple[int, int] | None = None  # [lo, hi) global ids the sample may take
    stop_ids: tuple[int, ...] = ()  # ids that end a sequence early (allowed too; not returned)
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    pad_id: int = 0
    min_new_tokens: int = 1  # stop ids are masked until this many tokens exist


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """list of 1-D id tensors -> ids (N, P) left-padded, lengths (N,)."""
    lens = torch.tensor([len(p) for p in prompts])
    P = int(lens.max())
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = p
    return ids, lens


def _restrict(logits: torch.Tensor, cfg: SamplingConfig, t: int = 0) -> torch.Tensor:
    """Mask logits (N, V) to the allowed range plus stop ids; apply temperature/top-k."""
    if cfg.allowed is not None or cfg.stop_ids:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        lo, hi = cfg.allowed if cfg.allowed is not None else (0, logits.shape[-1])
        keep[lo:hi] = True
        if cfg.stop_ids and t >= cfg.min_new_tokens:
            keep[list(cfg.stop_ids)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _sample(
    logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None, t: int = 0
) -> torch.Tensor:
    logits = _restrict(logits.float(), cfg, t)
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits, dim=-1)
    # sample on the CPU generator so results do not depend on the device
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: list[torch.Tensor],
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    fixed_steps: bool = False,
    forward: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of `prompts`.

    Returns tokens (N, max_new_tokens) padded with pad_id after a stop, and lengths (N,) of the
    generated parts (stop id excluded). With fixed_steps every call runs exactly max_new_tokens
    decode steps, so that processes which must stay in lockstep never disagree on the count.
    `forward(ids, positions, doc_ids, cache=...)` replaces model(...) (e.g. to gather weights).
    """
    fwd = forward or model
    was_training = model.training
    model.eval()  # dropout off
    device = model.tok_embeddings.weight.device
    ids, lens = left_pad(prompts, cfg.pad_id)
    ids, lens = ids.to(device), lens.to(device)
    N, P = ids.shape
    slot = torch.arange(P, device=device)
    real = slot[None, :] >= (P - lens)[:, None]  # (N, P)
    positions = (slot[None, :] - (P - lens)[:, None]).clamp(min=0)
    doc = real.long() - 1  # pad slots: doc -1, prompt + generated tokens: doc 0
    out = torch.full((N, cfg.max_new_tokens), cfg.pad_id, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    gen_len = torch.zeros(N, dtype=torch.long, device=device)
    stop = torch.tensor(list(cfg.stop_ids) or [-1], device=device)

    cache = None
    if use_cache:
        dtype = model.tok_embeddings.weight.dtype
        cache = KVCache.empty(model.cfg, N, P + cfg.max_new_tokens, device, dtype)
        logits = fwd(ids, positions, doc, cache=cache)[:, -1]
    else:
        logits = fwd(ids, positions, doc)[:, -1]
    seq, seq_pos, seq_doc = ids, positions, doc
    for t in range(cfg.max_new_tokens):
        nxt = _sample(logits, cfg, generator, t)
        is_stop = torch.isin(nxt, stop) & ~done
        newly = ~done & ~is_stop
        out[:, t] = torch.where(newly, nxt, torch.full_like(nxt, cfg.pad_id))
        gen_len += newly.long()
        done |= is_stop
        if t == cfg.max_new_tokens - 1 or (bool(done.all()) and not fixed_steps):
            break
        pos = (lens + t)[:, None]
        tok = nxt[:, None]
        if cache is not None:
            logits = fwd(tok, pos, torch.zeros_like(tok), cache=cache)[:, -1]
        else:  # the naive path: recompute the whole sequence every step
            seq = torch.cat([seq, tok], 1)
            seq_pos = torch.cat([seq_pos, pos], 1)
            seq_doc = torch.cat([seq_doc, torch.zeros_like(tok)], 1)
            logits = fwd(seq, seq_pos, seq_doc)[:, -1]
    model.train(was_training)
    return out, gen_len
