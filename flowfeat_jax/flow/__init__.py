"""Optical-flow teachers in plain PyTorch (SEA-RAFT, RAFT) and the OpenCV DIS fallback."""
