"""Evaluation: DAVIS J&F scorer, label propagation and linear probe."""
