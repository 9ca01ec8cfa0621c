"""Sequence building: a sample's modalities -> one document ``[bos] <a> A <b> B ... [eos]``.

A document is planned from token counts alone (`plan_doc`), so mixing and packing never read
data; `write_doc` then fills a row slice from the real arrays. Block order is a seeded random
permutation per sample (commutative modelling) or fixed. Truncation never separates a modality
token from its content: a block that does not fit is shortened (variable-length modalities) or
dropped whole (fixed-length ones such as images).

Per target token the row also records its modality and *direction* (which block it belongs to
and which block preceded it), so that losses can be reported per direction: "a", "a->b",
"c'->a" (a prime marks a generated block).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from loretta.config import SequenceConfig
from loretta.vocab import VocabLayout

IGNORE = -100  # target value that carries no loss


class Block(NamedTuple):
    modality: int  # index into layout.modalities
    n: int  # content tokens
    gen_from: int = -1  # -1: real data; else generated from this (real) modality of the sample


class DocPlan(NamedTuple):
    source: int
    sample: int
    epoch: int  # the source epoch this sample was drawn in
    blocks: tuple[Block, ...]
    length: int  # tokens in the row, specials included


def mix64(*xs: int) -> int:
    """A 64-bit hash of integers (splitmix64 chain): cheap per-sample randomness."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


def unit_float(h: int) -> float:
    return (h >> 11) / float(1 << 53)


def direction_names(layout: VocabLayout) -> list[str]:
    """Every direction label a token can get; indices are stable for a given layout."""
    names = layout.names
    out = []
    for t in names:
        out += [t, f"{t}'"]
    for s, t in itertools.permutations(names, 2):
        out += [f"{s}->{t}", f"{s}'->{t}", f"{s}->{t}'", f"{s}'->{t}'"]
    return out


class SequenceBuilder:
    """Plans and writes documents for one layout and sequence config."""

    def __init__(self, layout: VocabLayout, cfg: SequenceConfig, seq_len: int, seed: int) -> None:
        self.layout, self.cfg, self.seq_len, self.seed = layout, cfg, seq_len, seed
        names = layout.names
        self.M = len(names)
        self.caps = [cfg.max_tokens.get(n, 1 << 30) for n in names]
        self.fixed = [layout.modalities[i].fixed_length is not None for i in range(self.M)]
        fixed_order = cfg.fixed_order or names
        self.fixed_rank = {names.index(n): r for r, n in enumerate(fixed_order) if n in names}
        self.specials = int(cfg.add_bos) + int(cfg.add_eos)
        self._perms: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        dirs = direction_names(layout)
        self.dir_index = {n: i for i, n in enumerate(dirs)}
        self.n_directions = len(dirs)

    # ---- planning (token counts only) --------------------------------------------------------
    def order(self, present: tuple[int, ...], h: int) -> tuple[int, ...]:
        """Block order for a sample with modalities `present` (hash h picks the permutation)."""
        fixed = self.cfg.order == "fixed" or (
            self.cfg.shuffle_prob < 1.0 and unit_float(mix64(h, 1)) >= self.cfg.shuffle_prob
        )
        if fixed:
            return tuple(sorted(present, key=lambda m: (self.fixed_rank.get(m, 1 << 20), m)))
        perms = self._perms.get(present)
        if perms is None:
            perms = self._perms[present] = list(itertools.permutations(present))
        return perms[h % len(perms)]

    def fit(self, wanted: list[Block]) -> tuple[Block, ...]:
        """Apply per-modality caps and the row length; never split a modality token off."""
        budget = self.seq_len - self.specials
        out = []
        for b in wanted:
            n = min(b.n, self.caps[b.modality])
            room = budget - 1
            if n <= 0 or room < 1:
                break
            if n > room:
                if self.fixed[b.modality]:
                    break  # a fixed-length modality is kept whole or not at all
                n = room
            out.append(Block(b.modality, n, b.gen_from))
            budget -= 1 + n
        return tuple(out)

    def doc_length(self, blocks: tuple[Block, ...]) -> int:
        return self.specials + sum(1 + b.n for b in blocks)

    def plan(
        self, source: int, sample: int, epoch: int, lengths: np.ndarray, h: int, row: int = 0
    ) -> DocPlan | None:
        """Plain (commutative or fixed-order) document of real modalities; None if nothing fits."""
        present = tuple(int(m) for m in np.flatnonzero(lengths))
        order = self.order(present, h)
        blocks = self.fit([Block(m, int(lengths[m])) for m in order])
        if not blocks:
            return None
        return DocPlan(source, sample, epoch, blocks, self.doc_length(blocks))

    def direction(self, blocks: tuple[Block, ...], k: int) -> int:
        b = blocks[k]
        tgt = self.layout.names[b.modality] + ("'" if b.gen_from >= 0 else "")
        if k == 0:
            return self.dir_index[tgt]
        p = blocks[k - 1]
        src = self.layout.names[p.modality] + ("'" if p.gen_from >= 0 else "")
        return self.dir_index[f"{src}->{tgt}"]

    # ---- writing (real data) -----------------------------------------------------------------
    def write_doc(
        self,
        plan: DocPlan,
        arrays: dict[int, np.ndarray],
        row: dict[str, np.ndarray],
        start: int,
        doc_index: int,
        generated: dict[int, np.ndarray] | None = None,
        loss_on_generated: bool = False,
    ) -> list[tuple[int, int, Block]]:
        """Fill row[...][start:start+plan.length] with the document.

        `arrays` maps modality index -> local ids of the real blocks; `generated` maps block
        index -> local ids of generated blocks (a missing one is written as pad, to be filled
        later). Returns (row offset, length, block) of each generated block left unfilled.
        """
        L, lay = plan.length, self.layout
        end = start + L
        toks = row["tokens"]
        mods = np.full(L, -1, dtype=np.int64)
        dirs = np.full(L, -1, dtype=np.int64)
        train = np.ones(L, dtype=bool)
        pos = start
        if self.cfg.add_bos:
            toks[pos] = lay.bos_id
            pos += 1
        slots = []
        for k, b in enumerate(plan.blocks):
            m = lay.modalities[b.modality]
            d = self.direction(plan.blocks, k)
            toks[pos] = m.token_id
            dirs[pos - start] = d
            pos += 1
            if b.gen_from >= 0:
                if generated is not None and k in generated:
                    toks[pos : pos + b.n] = generated[k][: b.n].astype(np.int64) + m.offset
                else:
                    toks[pos : pos + b.n] = lay.pad_id
                    slots.append((pos, b.n, b))
                train[pos - start : pos - start + b.n] = loss_on_generated
            else:
                toks[pos : pos + b.n] = arrays[b.modality][: b.n].astype(np.int64) + m.offset
            mods[pos - start : pos - start + b.n] = b.modality
            dirs[pos - start : pos - start + b.n] = d
            pos += b.n
        if self.cfg.add_eos:
            toks[pos] = lay.eos_id
            dirs[pos - start] = dirs[pos - start - 1]
            pos += 1
        assert pos == end, (pos, end, plan)
        row["positions"][start:end] = np.arange(L)
        row["doc_ids"][start:end] = doc_index
        # target of token t is token t+1 of the same document; the last token has none
        tgt = row["targets"]
        tgt[start : end - 1] = toks[start + 1 : end]
        tgt[end - 1] = IGNORE
        keep = train[1:]
        tgt[start : end - 1][~keep] = IGNORE
        row["target_modality"][start : end - 1] = mods[1:]
        row["target_modality"][end - 1] = -1
        row["target_direction"][start : end - 1] = dirs[1:]
        row["target_direction"][end - 1] = -1
        return slots
