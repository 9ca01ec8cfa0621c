"""Byte sizes on the converter's command line (``--shard-size``).

Convention: SI units are decimal and IEC units binary, as Hugging Face does for shard sizes:
``2GB`` = 2_000_000_000 bytes, ``1GiB`` = 2**30, ``123`` = 123 bytes. Note: ``loretta-shards
--shard-size`` (loretta/data/tools.py) reads ``64MB`` as 64 MiB; the two parsers are kept
apart, each with its documented convention, until they are unified.
"""

from __future__ import annotations

import re

_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_byte_size(text: str, option: str = "--shard-size") -> int:
    """'2GB' -> 2_000_000_000; '500MiB' -> 500 * 2**20; '123' -> 123 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"{option}={text!r}: expected a size like 2GB, 500MB or 1GiB")
    unit = m.group(2).rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    size = int(float(m.group(1)) * base ** _POWER[unit.rstrip("i")])
    if size < 1:
        raise ValueError(f"{option}={text!r}: must be at least 1 byte")
    return size
