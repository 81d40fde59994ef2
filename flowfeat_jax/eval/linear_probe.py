"""Per-video linear probe for DAVIS (FlowFeat paper, Evaluation: linear probe).

For each video a linear map W of shape (D + 1, K) (features + bias -> K = objects + background classes) is fitted
to the first frame's labels by minimising the mean per-pixel softmax cross-entropy with Adam, 500 iterations,
lr 5e-3 and weight decay 5e-4. The reference's DAVIS validation (tum-vision/flowfeat train.py `validate_one`, a
small MLP probe there, 300 steps) fits with torch.optim.Adam(lr=5e-3, weight_decay=5e-4), i.e. an L2 term added to
the gradient before the Adam moments (not AdamW), and F.cross_entropy with mean reduction; we keep those and the
paper's linear map and 500 steps. W starts like a torch 1x1 conv, uniform in ±1/sqrt(D). Every frame is then
classified.

Features (paper): the FlowFeat decoder output (T, H, W, d) at the network input size concatenated with the encoder
features (T, h, w, C) upsampled bilinearly (align_corners=False) to H x W; with no FlowFeat features (encoder-only
baseline) the upsampled encoder features alone. The input size is 480 high with the width floored to a multiple of
64 (`davis_input_size`). First-frame labels are resized with PIL nearest to H x W; predicted logits are resized
bilinearly to the annotation size before the arg-max.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowfeat_jax.eval.davis import davis_input_size
from flowfeat_jax.eval.knn import resize_labels_nearest

__all__ = ["davis_input_size", "fit_first_frame", "fit_probe", "linear_probe_segment", "predict_labels",
           "probe_features"]


def probe_features(flowfeat: jax.Array | None, encoder: jax.Array, input_hw: tuple[int, int]) -> jax.Array:
    """Probe input (B, H, W, d + C): FlowFeat features and bilinearly upsampled encoder features, concatenated."""
    batch, channels = encoder.shape[0], encoder.shape[-1]
    upsampled = jax.image.resize(encoder.astype(jnp.float32), (batch, *input_hw, channels), method="linear")
    if flowfeat is None:
        return upsampled
    if flowfeat.shape[1:3] != tuple(input_hw):
        raise ValueError(f"FlowFeat features are {flowfeat.shape[1]}x{flowfeat.shape[2]}, expected the input size "
                         f"{input_hw[0]}x{input_hw[1]}")
    return jnp.concatenate([flowfeat.astype(jnp.float32), upsampled], axis=-1)


def _logits(weights: jax.Array, features: jax.Array) -> jax.Array:
    """[features, 1] @ W: (..., D) -> (..., K)."""
    return features @ weights[:-1] + weights[-1]


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_probe(features: jax.Array, labels: jax.Array, num_classes: int, key: jax.Array, *, steps: int = 500,
              learning_rate: float = 5e-3, weight_decay: float = 5e-4) -> jax.Array:
    """Fit the (D + 1, K) probe on one frame.

    Args:
      features: (H, W, D) probe features of the first frame.
      labels: (H, W) integer labels 0..K-1 at the same size.
      num_classes: K (background + objects).
      key: PRNG key of the initial weights.
    Returns:
      (D + 1, K) float32 weights, the last row being the bias.
    """
    dim = features.shape[-1]
    flat = features.reshape(-1, dim).astype(jnp.float32)
    targets = labels.reshape(-1).astype(jnp.int32)
    bound = 1.0 / np.sqrt(dim)
    weights = jax.random.uniform(key, (dim + 1, num_classes), jnp.float32, -bound, bound)
    # torch Adam(weight_decay): the L2 gradient wd·W joins the loss gradient before the moment estimates.
    optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))

    # Dense one-hot targets: the integer-label form's gather/scatter on ~4e5 pixels makes XLA constant-fold slowly.
    one_hot = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)

    def loss_fn(w):
        return optax.softmax_cross_entropy(_logits(w, flat), one_hot).mean()

    def step(_, state):
        w, opt_state = state
        grads = jax.grad(loss_fn)(w)
        updates, opt_state = optimizer.update(grads, opt_state, w)
        return optax.apply_updates(w, updates), opt_state

    weights, _ = jax.lax.fori_loop(0, steps, step, (weights, optimizer.init(weights)))
    return weights


@functools.partial(jax.jit, static_argnames=("input_hw", "out_hw"))
def predict_labels(weights: jax.Array, flowfeat: jax.Array | None, encoder: jax.Array,
                   input_hw: tuple[int, int], out_hw: tuple[int, int]) -> jax.Array:
    """Labels (B, H_out, W_out) int32 of a batch of frames: probe logits resized bilinearly to `out_hw`, arg-max."""
    logits = _logits(weights, probe_features(flowfeat, encoder, input_hw))
    logits = jax.image.resize(logits, (logits.shape[0], *out_hw, logits.shape[-1]), method="linear")
    return jnp.argmax(logits, axis=-1)


def fit_first_frame(flowfeat: jax.Array | None, encoder: jax.Array, first_annotation: np.ndarray,
                    input_hw: tuple[int, int], *, key: jax.Array | None = None, steps: int = 500,
                    learning_rate: float = 5e-3, weight_decay: float = 5e-4) -> jax.Array:
    """Fit the probe on frame 0: `flowfeat` (H, W, d) or None, `encoder` (h, w, C), annotation (H0, W0) uint8.

    The annotation is resized with PIL nearest to `input_hw`; K = max label + 1. Returns (d + C + 1, K) weights.
    """
    input_hw = tuple(input_hw)
    features = probe_features(None if flowfeat is None else flowfeat[None], encoder[None], input_hw)[0]
    labels = jnp.asarray(resize_labels_nearest(first_annotation, input_hw))
    key = jax.random.key(0) if key is None else key
    return fit_probe(features, labels, int(first_annotation.max()) + 1, key, steps=steps,
                     learning_rate=learning_rate, weight_decay=weight_decay)


def linear_probe_segment(flowfeat: jax.Array | None, encoder: jax.Array, first_annotation: np.ndarray,
                         input_hw: tuple[int, int], *, batch_size: int = 4, **fit_kwargs) -> np.ndarray:
    """Segment a video with a linear probe fitted on its first annotation.

    Args:
      flowfeat: (T, H, W, d) FlowFeat features at the input size, or None for encoder-only probing.
      encoder: (T, h, w, C) encoder features of the same frames.
      first_annotation: (H0, W0) uint8 labels of frame 0 (0 = background, 1..K-1 objects).
      input_hw: the network input size (H, W), e.g. davis_input_size(480, 854) = (480, 832).
      batch_size: frames classified per call (memory: batch · H · W · (d + C) floats).
      **fit_kwargs: key, steps, learning_rate, weight_decay of `fit_first_frame`.
    Returns:
      (T, H0, W0) uint8 predicted label maps; frame 0 is the probe's own prediction on the fitting frame.
    """
    input_hw, out_hw = tuple(input_hw), tuple(first_annotation.shape)
    weights = fit_first_frame(None if flowfeat is None else flowfeat[0], encoder[0], first_annotation, input_hw,
                              **fit_kwargs)
    predictions = []
    for start in range(0, encoder.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        chunk_flowfeat = None if flowfeat is None else flowfeat[chunk]
        predictions.append(np.asarray(predict_labels(weights, chunk_flowfeat, encoder[chunk], input_hw, out_hw)))
    return np.concatenate(predictions).astype(np.uint8)
