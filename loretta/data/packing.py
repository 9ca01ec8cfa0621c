"""Packing documents into fixed-length rows (best fit over a small lookahead buffer).

Rows never split a document: each row takes, repeatedly, the longest buffered document that
still fits (earliest first among equals), then pads the rest. The buffer is part of the
loader state, so packing resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loretta.data.sequences import Block, DocPlan


class Packer:
    def __init__(self, seq_len: int, lookahead: int) -> None:
        self.seq_len, self.lookahead = seq_len, lookahead
        self.buffer: list[DocPlan] = []

    def next_row(self, refill: Callable[[], DocPlan]) -> list[DocPlan]:
        row: list[DocPlan] = []
        room = self.seq_len
        while room > 0:
            while len(self.buffer) < self.lookahead:
                self.buffer.append(refill())
            best, best_len = -1, 0
            for i, d in enumerate(self.buffer):
                if best_len < d.length <= room:
                    best, best_len = i, d.length
            if best < 0:
                break
            row.append(self.buffer.pop(best))
            room -= best_len
        return row

    def state_dict(self) -> list[list[Any]]:
        return [
            [d.source, d.sample, d.epoch, [list(b) for b in d.blocks], d.length]
            for d in self.buffer
        ]

    def load_state_dict(self, s: list[list[Any]]) -> None:
        self.buffer = [
            DocPlan(
                int(src),
                int(smp),
                int(ep),
                tuple(Block(*(int(x) for x in b)) for b in blocks),
                int(n),
            )
            for src, smp, ep, blocks, n in s
        ]
