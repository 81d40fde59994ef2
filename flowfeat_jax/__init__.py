"""FlowFeat in JAX/Flax NNX: pixel-dense features learned from optical flow.

    import flowfeat_jax
    model = flowfeat_jax.load("runs/demo")             # a run directory, a checkpoint step, or a .pth / .safetensors
    encoder, flowfeat = model(images_uint8)            # (B, H, W, 3) or (H, W, 3) uint8 RGB, NumPy or JAX, any size
"""


def load(path, **kwargs):
    """`flowfeat_jax.inference.load`: a FeatureExtractor of a run directory or a reference-layout weights file."""
    from flowfeat_jax import inference  # imported on use: `import flowfeat_jax` (configs/demo.py) stays light

    return inference.load(path, **kwargs)
