"""Training loops with checkpoints, early stopping and resume."""
