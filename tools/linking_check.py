"""Synthetic linking check: LoReTTa vs commutative-only on a modality pair never seen together.
See loretta/linking.py."""

import sys

from loretta.linking import main

if __name__ == "__main__":
    sys.exit(main())
