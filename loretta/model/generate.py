"""Batched, KV-cached sampling restricted to one modality's id range.

Prompts of different lengths are left-padded; pad slots form their own document so that real
tokens never attend to them, and positions start at 0 at each prompt's first real token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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


def _mask_pair(cfg: SamplingConfig, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.zeros(vocab, dtype=torch.bool)
    lo, hi = cfg.allowed if cfg.allowed is not None else (0, vocab)
    keep[lo:hi] = True
    late = keep.clone()
    if cfg.stop_ids:
        late[list(cfg.stop_ids)] = True
    return keep, late


def _keep_masks(
    cfg: SamplingConfig,
    vocab: int,
    device: torch.device,
    rows: list[SamplingConfig] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Masks of the ids a sample may take before and from min_new_tokens on (stop ids
    allowed), built once per call on the device: (V,) from `cfg`, or (N, V) from per-row
    configs; None when every id is allowed."""
    if rows is not None:
        pairs = [_mask_pair(r, vocab) for r in rows]
        keep, late = torch.stack([k for k, _ in pairs]), torch.stack([lt for _, lt in pairs])
        return keep.to(device), late.to(device)
    if cfg.allowed is None and not cfg.stop_ids:
        return None
    keep, late = _mask_pair(cfg, vocab)
    return keep.to(device), late.to(device)


def _mask(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    t: int = 0,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mask logits (N, V) to the allowed range plus stop ids (stops from min_new_tokens on)."""
    if masks is None and (cfg.allowed is not None or cfg.stop_ids):
        masks = _keep_masks(cfg, logits.shape[-1], logits.device)
    if masks is not None:
        keep = masks[1] if t >= cfg.min_new_tokens else masks[0]
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def _restrict(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    t: int = 0,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mask logits (N, V) to the allowed range plus stop ids; apply temperature/top-k."""
    logits = _mask(logits, cfg, t, masks)
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def keyed_uniform(
    keys: torch.Tensor, t: int, n: int, cols: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) int64 keys -> (N, n) uniforms in (0, 1): a pure function of (key, t, column), so a
    row's noise does not depend on which other rows share its batch or on their order.
    `cols` (n,): the columns' ids (default 0..n-1), for noise on a subset of the vocabulary."""
    col = torch.arange(n, device=keys.device, dtype=torch.int64) if cols is None else cols
    step = _signed(((t + 1) * 0x9E3779B97F4A7C15) & (2**64 - 1))
    h = _mix(_mix(keys[:, None] ^ _mix(col[None, :] ^ step)))
    return (_shr(h, 11).double() + 0.5) * 2.0**-53


def _sample(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    gen: torch.Generator | None,
    t: int = 0,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    row_keys: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, V) logits -> (N,) ids, on the logits' device (no host sync): `gen` must live there.
    With `row_keys` (N,) the draw is Gumbel-max with noise that is a function of (key, t,
    token) alone: the same distribution, but batching-invariant. `cols`: the token ids of the
    logits' columns when they are a subset of the vocabulary (see _Group); ids returned are
    column indices."""
    if cfg.temperature <= 0 or cfg.top_k == 1:
        # greedy: the draw is the argmax of the allowed logits whatever the noise (Gumbel noise
        # would only break exact ties), so skip top-k and the (N, V) noise: a decode step on
        # the CPU spends a large share of its time there
        return _mask(logits.float(), cfg, t, masks).argmax(-1)
    logits = _restrict(logits.float(), cfg, t, masks)
    if row_keys is not None:
        u = keyed_uniform(row_keys, t, logits.shape[-1], cols)
        gumbel = -torch.log(-torch.log(u))
        return (logits.double() + gumbel).argmax(-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@dataclass
class _Group:
    """Rows of one call sampled alike (one temperature and top-k), as a call of their own would
    sample them. `rows`: their indices in the call (None: every row).

    A keyed draw works on `ids`, the token ids some row of the group may take, in order: noise
    is hashed and logits masked for those columns only (an image row of SVL-digits may take 4
    ids of about 400). Every other id is masked for every row, so the Gumbel-max draw, top-k
    threshold and greedy argmax are those of the full vocabulary: the same token (tested).
    Unkeyed draws (torch.multinomial) keep the full vocabulary."""

    cfg: SamplingConfig
    rows: torch.Tensor | None
    masks: tuple[torch.Tensor, torch.Tensor] | None
    keys: torch.Tensor | None
    ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.keys is None or self.masks is None:
            return
        keep, late = self.masks
        any_row = (keep | late).reshape(-1, keep.shape[-1]).any(0)
        self.ids = torch.nonzero(any_row).squeeze(1)  # one host sync, once per call
        self.masks = (keep.index_select(-1, self.ids), late.index_select(-1, self.ids))

    def draw(self, logits: torch.Tensor, gen: torch.Generator | None, t: int) -> torch.Tensor:
        """(N, V) logits of the whole call -> (len(rows),) ids for this group's rows."""
        if self.rows is not None:
            logits = logits[self.rows]
        if self.ids is None:
            return _sample(logits, self.cfg, gen, t, self.masks, self.keys)
        sub = logits.index_select(-1, self.ids)
        return self.ids[_sample(sub, self.cfg, gen, t, self.masks, self.keys, self.ids)]


def _groups(
    cfg: SamplingConfig,
    rows: list[SamplingConfig] | None,
    masks: tuple[torch.Tensor, torch.Tensor] | None,
    keys: torch.Tensor | None,
    device: torch.device,
) -> list[_Group]:
    """The call's rows grouped by (temperature, top_k), each with its own masks and keys; one
    group of every row when they share a decoding (the rows', whatever cfg's) or have none."""
    if rows is None:
        return [_Group(cfg, None, masks, keys)]
    kinds: dict[tuple[float, int | None], list[int]] = {}
    for i, r in enumerate(rows):
        kinds.setdefault((r.temperature, r.top_k), []).append(i)
    if len(kinds) == 1:
        ((temperature, top_k),) = kinds
        return [_Group(replace(cfg, temperature=temperature, top_k=top_k), None, masks, keys)]
    out = []
    for (temperature, top_k), members in kinds.items():
        idx = torch.tensor(members, device=device)
        out.append(
            _Group(
                replace(cfg, temperature=temperature, top_k=top_k),
                idx,
                None if masks is None else (masks[0][idx], masks[1][idx]),
                None if keys is None else keys[idx],
            )
        )
    return out


def device_generator(gen: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device` for sampling there. A CPU generator on a CPU model is used as
    is (same tokens as sampling on the host); for another device, a new generator is seeded
    from it (one host-side draw per generate call, not one transfer per token)."""
    if gen is None or gen.device == device or (gen.device.type == device.type == "cpu"):
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.Generator(device).manual_seed(seed)


def _compiled_step(fwd: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fwd under torch.compile for one-token decode steps over a static cache. dynamo keys its
    cache on the code object, so a new wrapper per generate call reuses earlier compilations."""
    compiled: Callable[..., torch.Tensor] = torch.compile(fwd, mode="reduce-overhead")
    return compiled


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: list[torch.Tensor],
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    fixed_steps: bool = False,
    forward: Callable[..., torch.Tensor] | None = None,
    check_every: int = 8,
    static_cache: bool = False,
    compile_step: bool = False,
    row_keys: list[int] | None = None,
    row_cfgs: list[SamplingConfig] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of `prompts`.

    Returns tokens (N, max_new_tokens) padded with pad_id after a stop, and lengths (N,) of the
    generated parts (stop id excluded). With fixed_steps every call runs exactly max_new_tokens
    decode steps, so that processes which must stay in lockstep never disagree on the count.
    `forward(ids, positions, doc_ids, cache=...)` replaces model(...) (e.g. to gather weights).
    Sampling runs on the model's device with a generator there (see device_generator); without
    fixed_steps, whether every row has stopped is checked every `check_every` tokens.
    `static_cache` (always with compile_step): a KVCache whose decode steps all have one shape
    (see KVCache). `compile_step`: run decode steps through torch.compile(mode="reduce-overhead")
    (CUDA graphs on CUDA), over a static cache; `forward` must then be free of collectives
    (weights gathered once, not per layer group).
    `row_cfgs`: per-row allowed ids, stop ids, max_new_tokens, temperature and top-k (one call
    samples several modalities, each row in its own range with its own decoding); `cfg` still
    gives the call's steps (at least every row's max_new_tokens), pad id and min_new_tokens. A
    row's tokens past its own max_new_tokens are pad_id and not counted.
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
    done = torch.zeros(N, dtype=torch.bool, device=device)
    gen_len = torch.zeros(N, dtype=torch.long, device=device)
    # (rows, V) table of stop ids, one row per config: a row stops only on its own stop ids
    cfgs = row_cfgs if row_cfgs is not None else [cfg]
    stop = torch.zeros(len(cfgs), model.cfg.vocab_size, dtype=torch.bool)
    for i, r in enumerate(cfgs):
        stop[i, list(r.stop_ids)] = True
    stop = stop.to(device)
    stop_row = torch.arange(N, device=device) if row_cfgs is not None else torch.zeros_like(lens)
    gen = device_generator(generator, device)
    if row_cfgs is not None:
        assert len(row_cfgs) == N, (len(row_cfgs), N)
        assert all(r.max_new_tokens <= cfg.max_new_tokens for r in row_cfgs)
        row_max = torch.tensor([r.max_new_tokens for r in row_cfgs], device=device)
    masks = _keep_masks(cfg, model.cfg.vocab_size, device, row_cfgs)
    out = torch.full((N, cfg.max_new_tokens), cfg.pad_id, dtype=torch.long, device=device)
    keys = None
    if row_keys is not None:
        assert len(row_keys) == len(prompts), (len(row_keys), len(prompts))
        keys = torch.tensor([_signed(k & (2**64 - 1)) for k in row_keys], device=device)

    cache = None
    step = fwd
    if use_cache:
        dtype = model.tok_embeddings.weight.dtype
        static = compile_step or static_cache  # a compiled step needs one shape
        cache = KVCache.empty(model.cfg, N, P + cfg.max_new_tokens, device, dtype, static)
        logits = fwd(ids, positions, doc, cache=cache)[:, -1]  # prefill: eager
        if compile_step:
            # the step writes into the cache in place; CUDA graphs skip a function that mutates
            # an input unless that input's address is static (torch's cudagraph_utils
            # check_for_mutation), so unmarked the compiled step ran without graphs. Unguarded:
            # a new cache (a new generate call) re-records the graphs instead of recompiling.
            for buf in (cache.k, cache.v, cache.doc_ids, cache.pos):
                torch._dynamo.mark_static_address(buf, guard=False)
            step = _compiled_step(fwd)
    else:
        logits = fwd(ids, positions, doc)[:, -1]
    seq, seq_pos, seq_doc = ids, positions, doc
    # no host sync in this loop (no .item(), .cpu(), bool(tensor)) except the early-stop check
    # every `check_every` tokens when steps are not fixed: the device runs ahead of Python
    groups = _groups(cfg, row_cfgs, masks, keys, device)
    for t in range(cfg.max_new_tokens):
        if len(groups) == 1:
            nxt = groups[0].draw(logits, gen, t)
        else:
            nxt = torch.empty(N, dtype=torch.long, device=device)
            for g in groups:
                nxt[g.rows] = g.draw(logits, gen, t)
        is_stop = stop[stop_row, nxt] & ~done
        if row_cfgs is not None:
            is_stop |= t >= row_max  # past its own length: a row is done
        newly = ~done & ~is_stop
        out[:, t] = torch.where(newly, nxt, torch.full_like(nxt, cfg.pad_id))
        gen_len += newly.long()
        done |= is_stop
        if t == cfg.max_new_tokens - 1:
            break
        if not fixed_steps and (t + 1) % check_every == 0 and bool(done.all()):
            break  # every row has stopped; tokens after a stop are pad_id either way
        pos = (lens + t)[:, None]
        tok = nxt[:, None]
        if cache is not None:
            logits = step(tok, pos, torch.zeros_like(tok), cache=cache)[:, -1]
        else:  # the naive path: recompute the whole sequence every step
            seq = torch.cat([seq, tok], 1)
            seq_pos = torch.cat([seq_pos, pos], 1)
            seq_doc = torch.cat([seq_doc, torch.zeros_like(tok)], 1)
            logits = fwd(seq, seq_pos, seq_doc)[:, -1]
    model.train(was_training)
    return out, gen_len
