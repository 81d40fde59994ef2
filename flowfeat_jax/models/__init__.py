"""Flax NNX model families: ViT encoders, DPT decoder, FlowFeat."""
