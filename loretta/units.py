"""Sizes given on command lines and in configs: one parser, one convention for the project.

Decimal units are powers of 1000, as Hugging Face (`max_shard_size="5GB"`), disk vendors and SI
use them; binary units say so with an ``i``:

    123       123 bytes           (also 123B)
    64KB      64 * 1000           64KiB   64 * 1024
    64MB      64 * 1000**2        64MiB   64 * 1024**2
    2GB       2 * 1000**3         2GiB    2 * 1024**3
    1TB       1000**4             1TiB    1024**4

Units are case-insensitive (``64mb`` = ``64MB``); a bare letter (``64M``) is decimal, like its
``B`` form. Fractions are allowed (``1.5GB``); the result is rounded down to whole bytes.
"""

from __future__ import annotations

import re

_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in `text` ('2GB' -> 2_000_000_000, '64MiB' -> 67_108_864, '123' -> 123).

    Raises ValueError naming `what` (e.g. "--shard-size"), the text and the accepted forms."""
    m = _PATTERN.fullmatch(str(text).lower())
    if m is None or (m.group(3) and not m.group(2)):  # 'ib' alone is not a unit
        raise ValueError(
            f"{what}={text!r}: expected a size such as 64MB (64,000,000 bytes), 64MiB "
            "(67,108,864 bytes), 2GB or 123 (bytes)"
        )
    base = 1024 if m.group(3) else 1000
    size = int(float(m.group(1)) * base ** _POWERS[m.group(2)])
    if size < 1:
        raise ValueError(f"{what}={text!r}: must be at least 1 byte")
    return size
