"""Per-video linear probe for DAVIS (FlowFeat paper, Evaluation: linear probe), on device.

For each video a linear map W of shape (D + 1, K) (features + bias -> K = objects + background classes) is fitted
to the first frame's labels by minimising the mean per-pixel softmax cross-entropy with Adam, 500 iterations,
lr 5e-3 and weight decay 5e-4. The reference's DAVIS validation (tum-vision/flowfeat train.py `validate_one`, a
small MLP probe there, 300 steps) fits with torch.optim.Adam(lr=5e-3, weight_decay=5e-4), i.e. an L2 term added to
the gradient before the Adam moments (not AdamW), and F.cross_entropy with mean reduction; we keep those and the
paper's linear map and 500 steps. W starts like a torch 1x1 conv, uniform in ±1/sqrt(D). Every frame is then
classified.

Resolution ("on the native feature resolution produced by the model"):
- FlowFeat rows: the decoder output (H, W, d) at the network input size concatenated with the encoder features
  (h, w, C) upsampled bilinearly (align_corners=False) to H x W; labels resized with PIL nearest to H x W.
- Encoder rows: the probe runs on the patch grid (h, w), first-frame labels resized with PIL nearest to it
  (`ProbeSettings.encoder_grid = "patch"`); "input" instead upsamples the encoder features to H x W first.
Predicted logits are resized bilinearly to the annotation size before the arg-max.

Factorised logits. Bilinear resizing R is linear per channel, so [F, R(E)] W = F W_F + R(E W_E): the encoder part
is projected on its own grid and only K channels are upsampled. Fitting and prediction never build the (H, W, d + C)
concatenation (820 MB per 480p frame at d + C = 512); the model and its gradients are the same.

Classes. The class axis is padded to a bucket (`class_bucket`: a power of two) so videos with different object
counts share one compiled fit; logits of padded classes are masked to -1e9, so they get no probability, no gradient
and are never predicted.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowfeat_jax.eval.davis import davis_input_size
from flowfeat_jax.eval.knn import resize_labels_nearest

__all__ = ["ProbeSettings", "class_bucket", "davis_input_size", "fit_first_frame", "fit_probe",
           "linear_probe_segment", "predict_labels", "probe_logits"]

ENCODER_GRIDS = ("patch", "input")
_MASKED = -1e9


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """The linear-probe protocol; `encoder_grid` is where encoder-only probes run ("patch" as the paper)."""

    steps: int = 500
    learning_rate: float = 5e-3
    weight_decay: float = 5e-4
    encoder_grid: str = "patch"
    seed: int = 0

    def __post_init__(self):
        if self.encoder_grid not in ENCODER_GRIDS:
            raise ValueError(f"probe encoder_grid must be one of {ENCODER_GRIDS}, got {self.encoder_grid!r}")


def class_bucket(num_classes: int) -> int:
    """Padded class count: the next power of two, at least 2 (DAVIS-2016: 2; DAVIS-2017 val: up to 8)."""
    return max(2, 1 << (int(num_classes) - 1).bit_length())


def probe_logits(weights: jax.Array, flowfeat: jax.Array | None, encoder: jax.Array, hw: tuple[int, int],
                 num_valid: jax.Array | int | None = None) -> jax.Array:
    """[F, R(E), 1] @ W at size `hw` = F W_F + R(E W_E) + b (see the module docstring), (B, *hw, K).

    Args:
      weights: (d + C + 1, K) with rows [FlowFeat (d, absent when flowfeat is None); encoder (C); bias].
      flowfeat: (B, *hw, d) features at `hw`, or None.
      encoder: (B, h, w, C) features, upsampled bilinearly (align_corners=False) to `hw` when it differs.
      num_valid: classes in use; logits of classes >= num_valid are masked (None: all).
    """
    batch, channels = encoder.shape[0], encoder.shape[-1]
    num_classes = weights.shape[-1]
    logits = encoder.astype(jnp.float32) @ weights[-1 - channels: -1]
    if logits.shape[1:3] != tuple(hw):
        logits = jax.image.resize(logits, (batch, *hw, num_classes), method="linear")
    if flowfeat is not None:
        if flowfeat.shape[1:3] != tuple(hw):
            raise ValueError(f"FlowFeat features are {flowfeat.shape[1]}x{flowfeat.shape[2]}, expected the input "
                             f"size {hw[0]}x{hw[1]}")
        logits = logits + flowfeat.astype(jnp.float32) @ weights[: -1 - channels]
    logits = logits + weights[-1]
    if num_valid is not None:
        logits = jnp.where(jnp.arange(num_classes) < num_valid, logits, _MASKED)
    return logits


def init_weights(key: jax.Array, dim: int, num_classes: int) -> jax.Array:
    """(dim + 1, K) weights uniform in ±1/sqrt(dim), as a torch 1x1 conv / Linear."""
    bound = 1.0 / np.sqrt(dim)
    return jax.random.uniform(key, (dim + 1, num_classes), jnp.float32, -bound, bound)


def fit_probe(flowfeat: jax.Array | None, encoder: jax.Array, labels: jax.Array, num_classes: int, key: jax.Array,
              *, num_valid: jax.Array | int | None = None, steps: int = 500, learning_rate: float = 5e-3,
              weight_decay: float = 5e-4) -> jax.Array:
    """Fit the probe on one frame with `steps` Adam iterations in one `lax.fori_loop` (traceable; jit it).

    Args:
      flowfeat: (H, W, d) FlowFeat features at the label size, or None.
      encoder: (h, w, C) encoder features (upsampled to the label size inside the logits when h, w differ).
      labels: (H, W) integer labels 0..num_valid-1: the size the probe is fitted at.
      num_classes: K of the weights (static; a `class_bucket` to share compilations).
      key: PRNG key of the initial weights.
      num_valid: classes actually present in the video (<= K); None: K.
    Returns:
      (d + C + 1, K) float32 weights, the last row being the bias.
    """
    hw = labels.shape
    dim = encoder.shape[-1] + (0 if flowfeat is None else flowfeat.shape[-1])
    flowfeat = None if flowfeat is None else flowfeat[None]
    # Dense one-hot targets: the integer-label form's gather/scatter on ~4e5 pixels makes XLA constant-fold slowly.
    one_hot = jax.nn.one_hot(labels.astype(jnp.int32), num_classes, dtype=jnp.float32)[None]
    # torch Adam(weight_decay): the L2 gradient wd·W joins the loss gradient before the moment estimates.
    optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))

    def loss_fn(w):
        return optax.softmax_cross_entropy(probe_logits(w, flowfeat, encoder[None], hw, num_valid), one_hot).mean()

    def step(_, state):
        w, opt_state = state
        updates, opt_state = optimizer.update(jax.grad(loss_fn)(w), opt_state, w)
        return optax.apply_updates(w, updates), opt_state

    weights = init_weights(key, dim, num_classes)
    weights, _ = jax.lax.fori_loop(0, steps, step, (weights, optimizer.init(weights)))
    return weights


def predict_labels(weights: jax.Array, flowfeat: jax.Array | None, encoder: jax.Array, hw: tuple[int, int],
                   out_hw: tuple[int, int], num_valid: jax.Array | int | None = None) -> jax.Array:
    """Labels (B, H_out, W_out) uint8 of a batch: logits at the fitting size `hw` resized bilinearly, arg-max."""
    logits = probe_logits(weights, flowfeat, encoder, hw, num_valid)
    logits = jax.image.resize(logits, (logits.shape[0], *out_hw, logits.shape[-1]), method="linear")
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "learning_rate", "weight_decay"))
def _fit(flowfeat, encoder, labels, num_valid, key, *, num_classes, steps, learning_rate, weight_decay):
    return fit_probe(flowfeat, encoder, labels, num_classes, key, num_valid=num_valid, steps=steps,
                     learning_rate=learning_rate, weight_decay=weight_decay)


_predict = jax.jit(predict_labels, static_argnums=(3, 4))


def fit_first_frame(flowfeat: jax.Array | None, encoder: jax.Array, first_annotation: np.ndarray,
                    input_hw: tuple[int, int], settings: ProbeSettings = ProbeSettings()) -> tuple[jax.Array, tuple]:
    """Fit the probe on frame 0 (`flowfeat` (H, W, d) or None, `encoder` (h, w, C), annotation (H0, W0) uint8).

    Returns the weights and the size they were fitted at (input size, or the patch grid for encoder-only probes).
    """
    grid = tuple(input_hw) if flowfeat is not None or settings.encoder_grid == "input" else encoder.shape[:2]
    labels = jnp.asarray(resize_labels_nearest(first_annotation, grid))
    num_valid = int(first_annotation.max()) + 1
    weights = _fit(flowfeat, encoder, labels, num_valid, jax.random.key(settings.seed),
                   num_classes=class_bucket(num_valid), steps=settings.steps,
                   learning_rate=settings.learning_rate, weight_decay=settings.weight_decay)
    return weights, grid


def linear_probe_segment(flowfeat: jax.Array | None, encoder: jax.Array, first_annotation: np.ndarray,
                         input_hw: tuple[int, int], settings: ProbeSettings = ProbeSettings()) -> np.ndarray:
    """Segment a video whose features are all at hand (tests and small inputs).

    Args:
      flowfeat: (T, H, W, d) FlowFeat features at the input size, or None for encoder-only probing.
      encoder: (T, h, w, C) encoder features of the same frames.
      first_annotation: (H0, W0) uint8 labels of frame 0 (0 = background, 1..K-1 objects).
      input_hw: the network input size (H, W), e.g. davis_input_size(480, 854) = (480, 832).
    Returns:
      (T, H0, W0) uint8 predicted label maps; frame 0 is the probe's own prediction on the fitting frame.
    """
    weights, grid = fit_first_frame(None if flowfeat is None else flowfeat[0], encoder[0], first_annotation,
                                    input_hw, settings)
    return np.asarray(_predict(weights, flowfeat, encoder, grid, first_annotation.shape,
                              int(first_annotation.max()) + 1))
