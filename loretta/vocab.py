"""The shared multimodal vocabulary: one id range per modality plus special and modality tokens.

Global id layout (all ranges contiguous, in this order)::

    [pad, bos, eos] [<m0>, <m1>, ...] [m0 ids ...] [m1 ids ...] ...

Shards store *local* ids (``0 <= id < modality.size``); the layout maps them to global ids by
adding the modality's offset. The layout is saved in every dataset manifest and every
checkpoint, and two layouts must be equal for data and model to be used together.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loretta.errors import DataError

N_SPECIAL = 3  # pad, bos, eos
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class Modality:
    name: str
    size: int  # number of local ids
    offset: int  # global id of local id 0
    token_id: int  # global id of the modality token, e.g. <image>
    fixed_length: int | None = None  # every sample of this modality has exactly this many tokens

    @property
    def stop(self) -> int:
        """One past the last global id of this modality."""
        return self.offset + self.size

    @property
    def token(self) -> str:
        return f"<{self.name}>"


@dataclass(frozen=True)
class VocabLayout:
    modalities: tuple[Modality, ...]
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    _by_name: dict[str, Modality] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.modalities})

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls, sizes: dict[str, int], fixed_lengths: dict[str, int] | None = None
    ) -> VocabLayout:
        """Lay out modalities in the given order: specials, modality tokens, then id ranges."""
        fixed_lengths = fixed_lengths or {}
        problems = []
        for name, size in sizes.items():
            if not name.isidentifier():
                problems.append(f"modality name {name!r} must be an identifier like 'image'")
            if int(size) < 1:
                problems.append(f"modality {name!r} size {size} must be >= 1")
        if not sizes:
            problems.append("a layout needs at least one modality")
        if problems:
            raise DataError("bad vocabulary layout: " + "; ".join(problems))
        n_mod = len(sizes)
        offset = N_SPECIAL + n_mod
        mods = []
        for i, (name, size) in enumerate(sizes.items()):
            mods.append(
                Modality(
                    name=name,
                    size=int(size),
                    offset=offset,
                    token_id=N_SPECIAL + i,
                    fixed_length=fixed_lengths.get(name),
                )
            )
            offset += int(size)
        return cls(modalities=tuple(mods))

    # ---- queries ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Total number of global ids (the minimum model vocabulary size)."""
        return max([m.stop for m in self.modalities] + [N_SPECIAL])

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modalities]

    @property
    def modality_token_ids(self) -> list[int]:
        return [m.token_id for m in self.modalities]

    def __getitem__(self, name: str) -> Modality:
        try:
            return self._by_name[name]
        except KeyError:
            raise DataError(
                f"modality {name!r} is not in the vocabulary layout (has: {self.names})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def index(self, name: str) -> int:
        return self.names.index(name)

    def modality_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Modality index per global id (-1 for specials and modality tokens)."""
        out = np.full(ids.shape, -1, dtype=np.int64)
        for i, m in enumerate(self.modalities):
            out[(ids >= m.offset) & (ids < m.stop)] = i
        return out

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "modalities": [
                {
                    "name": m.name,
                    "size": m.size,
                    "offset": m.offset,
                    "token_id": m.token_id,
                    "token": m.token,
                    "fixed_length": m.fixed_length,
                }
                for m in self.modalities
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "layout") -> VocabLayout:
        try:
            mods = tuple(
                Modality(
                    name=str(m["name"]),
                    size=int(m["size"]),
                    offset=int(m["offset"]),
                    token_id=int(m["token_id"]),
                    fixed_length=None if m.get("fixed_length") is None else int(m["fixed_length"]),
                )
                for m in d["modalities"]
            )
            layout = cls(
                modalities=mods,
                pad_id=int(d.get("pad_id", PAD_ID)),
                bos_id=int(d.get("bos_id", BOS_ID)),
                eos_id=int(d.get("eos_id", EOS_ID)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{where}: malformed vocabulary layout ({type(e).__name__}: {e}); "
                "expected {'modalities': [{'name', 'size', 'offset', 'token_id'}, ...]}"
            ) from e
        layout.check_consistent(where)
        return layout

    def check_consistent(self, where: str = "layout") -> None:
        """Ranges must not overlap each other, the specials or the modality tokens."""
        spans = [(self.pad_id, self.pad_id + 1, "pad"), (self.bos_id, self.bos_id + 1, "bos")]
        spans.append((self.eos_id, self.eos_id + 1, "eos"))
        for m in self.modalities:
            spans.append((m.token_id, m.token_id + 1, m.token))
            spans.append((m.offset, m.stop, f"{m.name} ids"))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in itertools.pairwise(spans):
            if b0 < a1:
                raise DataError(
                    f"{where}: vocabulary ranges overlap: {an} [{a0},{a1}) and {bn} [{b0},{b1})"
                )

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check_same(self, other: VocabLayout, mine: str, theirs: str) -> None:
        """Refuse to combine data/checkpoints built with different layouts."""
        if self == other:
            return
        diffs = []
        if self.names != other.names:
            diffs.append(f"modalities {self.names} vs {other.names}")
        else:
            for a, b in zip(self.modalities, other.modalities):
                if a != b:
                    diffs.append(f"{a.name}: {a} vs {b}")
        for attr in ("pad_id", "bos_id", "eos_id"):
            if getattr(self, attr) != getattr(other, attr):
                diffs.append(f"{attr} {getattr(self, attr)} vs {getattr(other, attr)}")
        raise DataError(
            f"vocabulary layout of {mine} differs from {theirs}: {'; '.join(diffs)}. "
            "Token ids would mean different things; rebuild the data with the same layout "
            "or start a new run from scratch."
        )


Part = tuple[str, np.ndarray]  # (modality name, local ids)


def encode(
    layout: VocabLayout, parts: Sequence[Part], bos: bool = True, open_: str | None = None
) -> np.ndarray:
    """[bos] <a> A <b> B ... [<open_>]: global ids of a document (or a prompt ending in a
    modality token that asks for `open_`)."""
    out: list[np.ndarray] = [np.array([layout.bos_id])] if bos else []
    for name, ids in parts:
        m = layout[name]
        out += [np.array([m.token_id]), np.asarray(ids, dtype=np.int64) + m.offset]
    if open_ is not None:
        out.append(np.array([layout[open_].token_id]))
    return np.concatenate(out).astype(np.int64)
