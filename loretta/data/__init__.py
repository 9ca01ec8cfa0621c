"""The data path: shards, sequences, mixing, packing, loader."""
