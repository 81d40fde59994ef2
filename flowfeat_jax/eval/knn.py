"""Label propagation by k nearest neighbours in feature space (DINO video-segmentation protocol).

Mirrors facebookresearch/dino eval_video_segmentation.py (`label_propagation`, `eval_video_tracking_davis`):
for every frame t >= 1 the context is the first frame (ground-truth labels) plus the soft predictions of the
`n_last_frames` = 7 previous frames. With L2-normalised features, the affinity of a target position q to a context
position s is a_qs = exp(<f_q, f_s> / τ), τ = 0.1, kept only when s lies within ±`radius` (= 12) grid cells of q
in both directions; over all context positions the `topk` = 5 largest a_qs are kept and normalised to sum to 1, and
the target's soft label is the weighted sum of their labels. Since exp is monotone, keeping the top-k affinities and
normalising them equals a softmax over the top-k logits <f_q, f_s>/τ, which is how it is computed here (no overflow).

Resolution. Propagation runs on the features' own grid (h, w): the patch grid for encoder features. Dense FlowFeat
features (H x W) make the (hw)² affinity large, so pool them first (`pool_features`) to a working stride, e.g. 4 or
8 pixels, and scale the neighbourhood so it covers the same image area as DINO's 12 patches: radius = 12·p / stride.
Queries are processed in chunks of `query_batch` positions, so memory is query_batch · (1 + n_last) · hw floats.

Labels. The first annotation is resized with PIL nearest straight to the grid (as DINO read_seg) and one-hot encoded.
Output soft labels are upsampled bilinearly (align_corners=False) by the stride to the network input size,
min-max normalised per class (DINO norm_mask), arg-maxed and resized with PIL nearest to the annotation size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flowfeat_jax.progress import progress


def resize_labels_nearest(labels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 label map resized with PIL nearest to (h, w) (DINO read_seg / its output resize)."""
    return np.asarray(Image.fromarray(np.asarray(labels, np.uint8)).resize((out_hw[1], out_hw[0]), Image.NEAREST))


def pool_features(features: jax.Array, stride: int) -> jax.Array:
    """Average-pool (T, H, W, C) features by `stride` (H and W must be multiples of it) to a KNN working grid."""
    t, h, w, c = features.shape
    if h % stride or w % stride:
        raise ValueError(f"feature grid {h}x{w} is not a multiple of the pooling stride {stride}")
    return features.reshape(t, h // stride, stride, w // stride, stride, c).mean(axis=(2, 4))


@functools.partial(jax.jit, static_argnames=("n_last_frames", "topk", "temperature", "radius", "query_batch"))
def propagate(features: jax.Array, first_labels: jax.Array, *, n_last_frames: int = 7, topk: int = 5,
              temperature: float = 0.1, radius: int | None = 12, query_batch: int | None = None) -> jax.Array:
    """Propagate first-frame labels through a video, DINO protocol.

    Args:
      features: (T, h, w, C) per-frame features.
      first_labels: (h, w, K) soft (usually one-hot) labels of frame 0 on the same grid.
      n_last_frames: previous predictions kept as context besides the first frame.
      topk: neighbours kept per target position.
      temperature: τ of the affinity exp(cos / τ).
      radius: neighbourhood half-size in grid cells (Chebyshev); None or 0 means no restriction.
      query_batch: target positions processed at once (None: all).
    Returns:
      (T, h, w, K) soft labels; frame 0 is `first_labels`.
    """
    num_frames, h, w, channels = features.shape
    num_classes = first_labels.shape[-1]
    n = h * w
    feats = features.reshape(num_frames, n, channels).astype(jnp.float32)
    feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)  # F.normalize
    rows, cols = jnp.arange(n) // w, jnp.arange(n) % w
    slots = 1 + n_last_frames  # slot 0: first frame; slots 1..n_last_frames: ring buffer of recent predictions

    def step(carry, inputs):
        context_feats, context_labels, valid = carry
        t, target = inputs

        def label_one_query(q):
            logits = context_feats @ target[q] / temperature  # (slots, n)
            keep = valid[:, None]
            if radius:
                near = (jnp.abs(rows - rows[q]) <= radius) & (jnp.abs(cols - cols[q]) <= radius)
                keep = keep & near[None, :]
            values, index = jax.lax.top_k(jnp.where(keep, logits, -jnp.inf).reshape(-1), topk)
            weights = jax.nn.softmax(values)  # = top-k affinities exp(cos/τ) normalised to sum 1
            return weights @ context_labels.reshape(-1, num_classes)[index]

        predicted = jax.lax.map(label_one_query, jnp.arange(n), batch_size=query_batch or n)  # (n, K)
        slot = 1 + (t - 1) % n_last_frames
        carry = (context_feats.at[slot].set(target), context_labels.at[slot].set(predicted), valid.at[slot].set(True))
        return carry, predicted

    context_feats = jnp.zeros((slots, n, channels), jnp.float32).at[0].set(feats[0])
    first = first_labels.reshape(n, num_classes).astype(jnp.float32)
    context_labels = jnp.zeros((slots, n, num_classes), jnp.float32).at[0].set(first)
    valid = jnp.zeros((slots,), bool).at[0].set(True)
    _, predicted = jax.lax.scan(step, (context_feats, context_labels, valid),
                                (jnp.arange(1, num_frames), feats[1:]))
    return jnp.concatenate([first[None], predicted]).reshape(num_frames, h, w, num_classes)


@functools.partial(jax.jit, static_argnames=("input_hw",))
def _soft_to_hard(soft: jax.Array, input_hw: tuple[int, int]) -> jax.Array:
    """(h, w, K) soft labels -> (H_in, W_in) arg-max after bilinear upsampling and per-class min-max (norm_mask)."""
    up = jax.image.resize(soft, (*input_hw, soft.shape[-1]), method="linear")
    low, high = up.min(axis=(0, 1)), up.max(axis=(0, 1))
    # DINO divides by (max - min) unguarded; a constant positive class would give NaN there, here it stays as is.
    scaled = jnp.where(high - low > 0, (up - low) / jnp.where(high - low > 0, high - low, 1), up)
    up = jnp.where(high > 0, scaled, up)
    return jnp.argmax(up, axis=-1).astype(jnp.uint8)


def labels_from_soft(soft: jax.Array, input_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """(T, h, w, K) soft labels -> (T, H, W) uint8 label maps at the annotation size `out_hw`."""
    return np.stack([resize_labels_nearest(np.asarray(_soft_to_hard(frame, tuple(input_hw))), out_hw)
                     for frame in soft])


def knn_segment(features: jax.Array, first_annotation: np.ndarray, input_hw: tuple[int, int], *,
                n_last_frames: int = 7, topk: int = 5, temperature: float = 0.1, radius: int | None = 12,
                query_batch: int | None = 1024) -> np.ndarray:
    """Segment a video by KNN propagation of its first annotation.

    Args:
      features: (T, h, w, C) features of the frames resized to `input_hw` (grid stride = input_h / h).
      first_annotation: (H, W) uint8 ground-truth labels of frame 0 (0 = background, 1..K-1 objects).
      input_hw: network input size the features were computed at, e.g. davis_input_size(480, 854) = (480, 832).
    Returns:
      (T, H, W) uint8 predicted label maps; frame 0 is the annotation itself.
    """
    _, h, w, _ = features.shape
    if input_hw[0] % h or input_hw[1] % w or input_hw[0] // h != input_hw[1] // w:
        raise ValueError(f"feature grid {h}x{w} does not tile the input {input_hw[0]}x{input_hw[1]} with one stride")
    num_classes = int(first_annotation.max()) + 1
    first = jax.nn.one_hot(resize_labels_nearest(first_annotation, (h, w)), num_classes)
    soft = propagate(jnp.asarray(features), first, n_last_frames=n_last_frames, topk=topk,
                     temperature=temperature, radius=radius, query_batch=query_batch)
    labels = labels_from_soft(progress(soft[1:], desc="knn upsample", leave=False), input_hw,
                              first_annotation.shape)
    return np.concatenate([np.asarray(first_annotation, np.uint8)[None], labels])
