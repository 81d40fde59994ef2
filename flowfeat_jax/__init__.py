"""FlowFeat in JAX/Flax NNX: pixel-dense features learned from optical flow.

    import flowfeat_jax
    model = flowfeat_jax.load("runs/demo")             # a run directory, a checkpoint step, or a .pth / .safetensors
    encoder, flowfeat = model(images_uint8)            # (B, H, W, 3) or (H, W, 3) uint8 RGB, NumPy or JAX, any size
"""

import pathlib
import tempfile


def load(path: str | pathlib.Path, *, decoder: str = "online", size: tuple[int, int] | None = None,
         stride: int = 1, dtype: str = "float32") -> "inference.FeatureExtractor":
    """A FlowFeat ready for images: `encoder, flowfeat = flowfeat_jax.load(path)(images_uint8)`.

    `path` is a run directory (or one of its checkpoints) or a reference-layout `.pth` / `.safetensors` file
    (tools/export_torch.py, or a released FlowFeat model). `decoder` is "online" (default: the model the reference
    validates and releases, recipe step 12) or "ema" (the teacher); a file holds one decoder (its `decoder_ema`, if
    any, is the "ema" one). See `inference.FeatureExtractor` for the call.
    """
    # Imported on use: `import flowfeat_jax` (every configs/*.py, through flowfeat_jax.config) stays light.
    from flowfeat_jax import inference
    from flowfeat_jax.apps import torch_files

    if inference.is_weights_file(path):
        with tempfile.TemporaryDirectory(prefix="flowfeat_load_") as tmp:  # the import's run dir, read back at once
            run_dir = torch_files.import_flowfeat(path, pathlib.Path(tmp) / "run")
            model, _, _ = inference.load_flowfeat(run_dir, decoder=decoder)
    else:
        model, _, _ = inference.load_flowfeat(path, decoder=decoder)
    return inference.FeatureExtractor(model, size=size, stride=stride, dtype=dtype)
