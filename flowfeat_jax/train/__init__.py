"""Training: crops, losses, ridge probe, EMA, the pure train step and the loop."""
