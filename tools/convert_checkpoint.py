"""Convert loretta checkpoints (a thin wrapper; the logic lives in loretta/checkpoint/).

python tools/convert_checkpoint.py SRC DST --to {safetensors,loretta,hf} [--dtype bf16]
python tools/convert_checkpoint.py inspect SRC
python tools/convert_checkpoint.py verify A B
"""

from __future__ import annotations

import sys

from loretta.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main())
