"""Create, inspect, verify and convert datasets (thin wrapper; the logic lives in
loretta/data/tools.py, installed as the `loretta-shards` console script).

    python tools/shards.py layout layout.json --modality image=256 --modality text=32000
    python tools/shards.py write samples/ data/pairs --layout layout.json --shard-size 64MB
    python tools/shards.py verify data/pairs
    python tools/shards.py --help
"""

from __future__ import annotations

import sys

from loretta.data.tools import main

if __name__ == "__main__":
    sys.exit(main())
