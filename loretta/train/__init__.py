"""Training: the trainer (set-up and loop), one step, loss, metrics, checkpoints, faults,
callbacks. Read trainer.py first."""
