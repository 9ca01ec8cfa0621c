"""Training: loop, checkpoints, metrics, faults."""
