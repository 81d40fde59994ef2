"""FlowFeat in JAX/Flax NNX: pixel-dense features learned from optical flow."""
