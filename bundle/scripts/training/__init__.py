"""Training: the fold runner (``python -m scripts.training``), its handlers, losses and metrics."""
