"""Convert loretta checkpoints (a thin wrapper; the logic lives in loretta/convert.py).

python tools/convert_checkpoint.py SRC DST --to {safetensors,loretta,hf} [--dtype bf16]
python tools/convert_checkpoint.py inspect SRC
python tools/convert_checkpoint.py verify A B
"""

from __future__ import annotations

import os
import sys

from loretta.convert import main

if __name__ == "__main__":
    code = main()
    # Done: every output file is closed and fsynced. Skip interpreter teardown: with the CUDA
    # build of torch, C++ static destructors page in ~150 MB of library data at exit (peak RSS
    # of a bare `import torch` goes from 540 to 690 MB on exit) and take a few hundred ms.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
