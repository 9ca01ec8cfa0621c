"""Packing documents into a fixed number of fixed-length rows (best fit, decreasing).

Rows never split a document. `pack` places documents, longest first (ties: the given order),
each into the row with the least room that still holds it; what no row holds is returned, in
order, for the caller to place elsewhere (the next chunk) or to drop and count.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from loretta.data.sequences import DocPlan


class Rows:
    """`n` rows of `seq_len` tokens being filled."""

    def __init__(self, n: int, seq_len: int) -> None:
        self.seq_len = seq_len
        self.rows: list[list[DocPlan]] = [[] for _ in range(n)]
        self.rooms = [(seq_len, i) for i in range(n)]  # sorted (room, row)

    def copy(self) -> Rows:
        out = Rows(0, self.seq_len)
        out.rows = [list(r) for r in self.rows]
        out.rooms = list(self.rooms)
        return out

    def pack(self, docs: list[DocPlan]) -> list[DocPlan]:
        """Best fit decreasing; returns the documents that fit nowhere (in their order)."""
        left = []
        for d in sorted(docs, key=lambda d: -d.length):
            i = bisect_left(self.rooms, (d.length, -1))
            if i == len(self.rooms):
                left.append(d)
                continue
            room, r = self.rooms.pop(i)
            self.rows[r].append(d)
            if room > d.length:
                insort(self.rooms, (room - d.length, r))
        return left

    def used(self) -> int:
        return sum(d.length for r in self.rows for d in r)
