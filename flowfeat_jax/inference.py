"""Load a trained FlowFeat (a run directory, one checkpoint step or a .pth) and compute features of images."""

from __future__ import annotations

import pathlib
import tempfile

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from flowfeat_jax import config as config_lib
from flowfeat_jax.models.flowfeat import FlowFeat
from flowfeat_jax.train import checkpoint as ckpt_lib
from flowfeat_jax.train import loop


def resolve_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """`path` is a work dir (its latest checkpoint), its `checkpoints/` folder, or one `checkpoints/<step>` folder."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or work dir")
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise FileNotFoundError(f"{path}: holds no finished checkpoint (expected checkpoints/<step>/state)")
    return directory, steps[-1]


def load_flowfeat(
    path: str | pathlib.Path, *, decoder: str = "online"
) -> tuple[FlowFeat, ml_collections.ConfigDict, int]:
    """The FlowFeat of a checkpoint with the online decoder (default: the model the reference validates and releases,
    recipe.md step 12) or the EMA teacher (`decoder="ema"`).

    Returns (model, config the run used, step).
    """
    if decoder not in ("ema", "online"):
        raise ValueError(f"decoder must be 'ema' or 'online', got {decoder!r}")
    directory, step = resolve_checkpoint(path)
    checkpointer = ckpt_lib.Checkpointer(directory)
    meta = checkpointer.restore_meta(step)
    config = config_lib.saved_run_config(meta["config"])
    encoder_dir = pathlib.Path(config.model.encoder)
    if config.model.encoder and not encoder_dir.exists() and (directory.parent / "encoder").is_dir():
        config.model.encoder = str(directory.parent / "encoder")  # an imported run dir that was moved
    model, source = loop.build_flowfeat(config.model, config.seed, init_decoder=False)
    encoder_params = nnx.to_pure_dict(nnx.state(model.encoder))
    ckpt_lib.check_same_encoder(meta, source, ckpt_lib.tree_digest(encoder_params), directory / str(step))
    decoder_params = nnx.to_pure_dict(nnx.state(model.decoder))  # abstract: shapes only
    tx = loop.make_optimizer(config.train, config.model.random_decoder)
    template = jax.eval_shape(
        lambda p: loop.init_train_state(p, tx, config.seed, loop.initial_flow_head(config)), decoder_params
    )
    state, _ = checkpointer.restore(step, template)
    checkpointer.close()
    nnx.update(model.decoder, state.ema_params if decoder == "ema" else state.params)
    return model, config, step


def valid_input_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Each side rounded to the nearest multiple of `multiple` (at least one multiple)."""
    return tuple(max(multiple, round(n / multiple) * multiple) for n in (height, width))


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB (B, H, W, 3) resized bilinearly (PIL, as DAVIS evaluation does) to `size` = (H', W')."""
    if images.shape[1:3] == tuple(size):
        return images
    return np.stack([np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR)) for image in images])


class FeatureExtractor:
    """`extractor(images_uint8) -> (encoder (B, h, w, C), flowfeat (B, H/stride, W/stride, d) or None)`, NumPy out.

    The one code path of `flowfeat_jax.load`, `tools/extract_features.py` and feature extraction in notebooks.
    `images` are uint8 RGB (B, H, W, 3) or one (H, W, 3), NumPy or JAX, any size: they are resized bilinearly to
    `size` (default: each side rounded to the nearest multiple of the patch, of twice the patch for FlowFeat, which
    the decoder needs) and ImageNet-normalised inside. `encoder` is the encoder's patch grid after its final
    LayerNorm (of the last hooked block for FlowFeat, recipe "Model"); `flowfeat` the decoder output average-pooled by
    `stride` (1 = the input size; None for an encoder without a decoder). One jitted function per input shape: feed
    batches of one size (pad the last one) to compile once.

    Args:
      model: a FlowFeat, or an encoder module (models.registry; then `flowfeat` is None).
      size: (H, W) model input size; multiples of 2·patch for FlowFeat, of the patch for an encoder.
      stride: pooling factor of the FlowFeat map (divides both sides of the input).
      dtype: output dtype ("float32" or "float16").
    """

    def __init__(self, model, *, size: tuple[int, int] | None = None, stride: int = 1, dtype: str = "float32"):
        from flowfeat_jax.eval.knn import pool_to_grid
        from flowfeat_jax.models import vit
        from flowfeat_jax.models.dpt import check_token_grid
        from flowfeat_jax.train.step import normalize_images

        self.model = model
        self.is_flowfeat = isinstance(model, FlowFeat)
        self.patch_size = model.cfg.encoder.patch_size if self.is_flowfeat else model.cfg.patch_size
        self.multiple = 2 * self.patch_size if self.is_flowfeat else self.patch_size
        if size is not None:
            (check_token_grid if self.is_flowfeat else vit.check_image_size)(*size, self.patch_size)
        if stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        self.size, self.stride, self.dtype = (tuple(size) if size is not None else None), stride, dtype
        graphdef, self._state = nnx.split(model)
        out_dtype = jnp.dtype(dtype)

        @jax.jit
        def features(state, frames):
            net = nnx.merge(graphdef, state)
            x = normalize_images(frames)
            if not self.is_flowfeat:
                out = net(x, hooks=(net.cfg.num_layers - 1,))
                return vit.patch_tokens(out.last_hidden_state, net.cfg, out.grid).astype(out_dtype), None
            encoder, flowfeat = net(x)
            if stride > 1:
                flowfeat = pool_to_grid(flowfeat, (flowfeat.shape[1] // stride, flowfeat.shape[2] // stride))
            return encoder.astype(out_dtype), flowfeat.astype(out_dtype)

        self._features = features

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The model input size for images of `height` x `width` (checked against the stride)."""
        size = self.size or valid_input_size(height, width, self.multiple)
        if self.is_flowfeat and (size[0] % self.stride or size[1] % self.stride):
            raise ValueError(f"stride {self.stride} does not divide the input size {size[0]}x{size[1]}")
        return size

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        images = np.asarray(images)
        single = images.ndim == 3
        images = images[None] if single else images
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 RGB (B, H, W, 3) or (H, W, 3), got {images.dtype} {images.shape}")
        frames = resize_images(images, self.input_size(*images.shape[1:3]))
        encoder, flowfeat = jax.device_get(self._features(self._state, frames))
        if single:
            return encoder[0], None if flowfeat is None else flowfeat[0]
        return encoder, flowfeat


def is_weights_file(path: str | pathlib.Path) -> bool:
    return pathlib.Path(path).suffix in (".pth", ".pt", ".safetensors")


def load(path: str | pathlib.Path, *, decoder: str = "online", size: tuple[int, int] | None = None,
         stride: int = 1, dtype: str = "float32") -> FeatureExtractor:
    """A FlowFeat ready for images: `encoder, flowfeat = flowfeat_jax.load(path)(images_uint8)`.

    `path` is a run directory (or one of its checkpoints) or a reference-layout `.pth` / `.safetensors` file
    (tools/export_torch.py, or a released FlowFeat model). `decoder` is "online" (default: the model the reference
    validates and releases, recipe step 12) or "ema" (the teacher); a file holds one decoder (its `decoder_ema`, if
    any, is the "ema" one). See FeatureExtractor for the call.
    """
    if is_weights_file(path):
        from flowfeat_jax.ports.flowfeat import import_flowfeat  # ports import this module (export_flowfeat)

        with tempfile.TemporaryDirectory(prefix="flowfeat_load_") as tmp:  # the import's run dir, read back at once
            model, _, _ = load_flowfeat(import_flowfeat(path, pathlib.Path(tmp) / "run"), decoder=decoder)
    else:
        model, _, _ = load_flowfeat(path, decoder=decoder)
    return FeatureExtractor(model, size=size, stride=stride, dtype=dtype)
