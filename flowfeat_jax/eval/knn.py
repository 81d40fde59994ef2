"""Label propagation by k nearest neighbours in feature space (DINO video-segmentation protocol), on device.

Mirrors facebookresearch/dino eval_video_segmentation.py (`label_propagation`, `eval_video_tracking_davis`):
for every frame t >= 1 the context is the first frame (ground-truth labels) plus the soft predictions of the
`n_last_frames` = 7 previous frames. With L2-normalised features, the affinity of a target position q to a context
position s is a_qs = exp(<f_q, f_s> / τ), τ = 0.1, kept only when s lies within ±`radius` (= 12) grid cells of q
in both directions; over all context positions the `topk` = 5 largest a_qs are kept and normalised to sum to 1, and
the target's soft label is the weighted sum of their labels. Since exp is monotone, keeping the top-k affinities and
normalising them equals a softmax over the top-k logits <f_q, f_s>/τ, which is how it is computed here (no overflow).

One frame at a time. `init_queue` / `propagate_frame` keep the context in a fixed-shape queue (slot 0: the first
frame, slots 1..n_last: a ring of the latest predictions with a validity flag), so one compiled step serves every
sequence length. `propagate` scans it over a whole (T, h, w, C) array.

FlowFeat (supplementary B.1 "Local KNN", `KnnSettings`): two streams on the ENCODER patch grid, (a) the encoder
features and (b) the FlowFeat features average-pooled over each p x p cell, each propagated with its own queue of
its own soft maps; per frame the two soft maps are averaged. Tab. 6 `knn scale 2`: both streams on a grid 2x finer
(FlowFeat pooled over p/2 cells, encoder features bilinearly upsampled x2), the radius still 12 cells.

Output path (DINO): the soft map is upsampled bilinearly (align_corners=False) by the grid stride to the network
input size, min-max normalised per class (norm_mask), arg-maxed, and resized with PIL nearest to the annotation
size. First-frame labels are resized with PIL nearest straight to the grid (DINO read_seg) and one-hot encoded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

KNN_STREAMS = ("both", "flowfeat")


@dataclasses.dataclass(frozen=True)
class KnnSettings:
    """The KNN protocol. `streams` applies to FlowFeat rows: "both" (supp. B.1) or "flowfeat" (pooled FlowFeat only).

    `scale` 1 works on the encoder patch grid, 2 on the 2x finer grid of Tab. 6. `query_batch` target positions are
    scored at once (memory: query_batch · (1 + n_last_frames) · h · w floats).
    """

    n_last_frames: int = 7
    topk: int = 5
    temperature: float = 0.1
    radius: int = 12
    scale: int = 1
    streams: str = "both"
    query_batch: int = 1024

    def __post_init__(self):
        if self.streams not in KNN_STREAMS:
            raise ValueError(f"knn streams must be one of {KNN_STREAMS}, got {self.streams!r}")
        if self.scale not in (1, 2):
            raise ValueError(f"knn scale must be 1 or 2, got {self.scale}")

    def grid_stride(self, patch_size: int) -> int:
        """Pixels per KNN grid cell: the patch size, or half of it at scale 2."""
        if patch_size % self.scale:
            raise ValueError(f"knn scale {self.scale} needs a patch size divisible by it, got {patch_size}")
        return patch_size // self.scale


def resize_labels_nearest(labels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 label map resized with PIL nearest to (h, w) (DINO read_seg / its output resize)."""
    return np.asarray(Image.fromarray(np.asarray(labels, np.uint8)).resize((out_hw[1], out_hw[0]), Image.NEAREST))


@functools.cache
def nearest_indices(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source rows (H_out,) and columns (W_out,) of PIL's nearest resize from `in_hw` to `out_hw`.

    Read off PIL itself (an index image resized), so `labels[rows][:, cols]` on device is PIL's result exactly.
    """
    rows = np.asarray(Image.fromarray(np.arange(in_hw[0], dtype=np.int32)[:, None]).resize((1, out_hw[0]),
                                                                                          Image.NEAREST))[:, 0]
    cols = np.asarray(Image.fromarray(np.arange(in_hw[1], dtype=np.int32)[None, :]).resize((out_hw[1], 1),
                                                                                          Image.NEAREST))[0]
    return rows.astype(np.int32), cols.astype(np.int32)


def pool_to_grid(features: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Average-pool (B, H, W, C) features over the cells of a (h, w) grid that tiles H x W (one cell per output)."""
    batch, height, width, channels = features.shape
    if height % grid_hw[0] or width % grid_hw[1] or height // grid_hw[0] != width // grid_hw[1]:
        raise ValueError(f"features of {height}x{width} do not tile into a {grid_hw[0]}x{grid_hw[1]} grid of "
                         "square cells")
    cell = height // grid_hw[0]
    return features.reshape(batch, grid_hw[0], cell, grid_hw[1], cell, channels).mean(axis=(2, 4))


def knn_streams(encoder: jax.Array, flowfeat: jax.Array | None, settings: KnnSettings) -> dict[str, jax.Array]:
    """The KNN input streams of a batch on the KNN grid: {"encoder": (B, h', w', C), "flowfeat": (B, h', w', d)}.

    encoder: (B, h, w, C) patch-grid features; flowfeat: (B, H, W, d) at the input size (H = p·h) or None.
    At scale 2 the encoder features are upsampled bilinearly x2 and FlowFeat is pooled over p/2 cells.
    """
    batch, h, w, channels = encoder.shape
    grid_hw = (h * settings.scale, w * settings.scale)
    streams = {"encoder": encoder.astype(jnp.float32)}
    if settings.scale != 1:
        streams["encoder"] = jax.image.resize(streams["encoder"], (batch, *grid_hw, channels), method="linear")
    if flowfeat is not None:
        streams["flowfeat"] = pool_to_grid(flowfeat.astype(jnp.float32), grid_hw)
    return streams


class Queue(NamedTuple):
    """Context of one stream: slot 0 the first frame, slots 1..n_last a ring of the latest predictions."""

    features: jax.Array  # (slots, n, C), L2-normalised
    labels: jax.Array  # (slots, n, K) soft labels
    valid: jax.Array  # (slots,) bool
    frame: jax.Array  # () int32: index of the next target frame (1, 2, ...)


def _normalize(features: jax.Array) -> jax.Array:
    """F.normalize over the channel axis."""
    return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def init_queue(first_features: jax.Array, first_labels: jax.Array, n_last_frames: int = 7) -> Queue:
    """The queue before frame 1: `first_features` (h, w, C), `first_labels` (h, w, K) soft (one-hot) labels."""
    h, w, channels = first_features.shape
    n, num_classes, slots = h * w, first_labels.shape[-1], 1 + n_last_frames
    features = jnp.zeros((slots, n, channels), jnp.float32).at[0].set(
        _normalize(first_features.reshape(n, channels).astype(jnp.float32)))
    labels = jnp.zeros((slots, n, num_classes), jnp.float32).at[0].set(
        first_labels.reshape(n, num_classes).astype(jnp.float32))
    return Queue(features, labels, jnp.zeros((slots,), bool).at[0].set(True), jnp.ones((), jnp.int32))


def _neighbourhoods(h: int, w: int, radius: int | None) -> tuple[jax.Array, jax.Array]:
    """Per grid cell the (2r+1)² cells of its window, (n, M) flat indices, and whether each lies on the grid.

    Top-k then runs over slots · M candidates, not slots · n (at the 68 x 120 grid of `knn scale 2`: 13x fewer).
    No radius: every cell.
    """
    if not radius:
        return jnp.broadcast_to(jnp.arange(h * w), (h * w, h * w)), jnp.ones((h * w, h * w), bool)
    offsets = jnp.arange(-radius, radius + 1)
    rows = (jnp.arange(h * w) // w)[:, None, None] + offsets[None, :, None]  # (n, 2r+1, 1)
    cols = (jnp.arange(h * w) % w)[:, None, None] + offsets[None, None, :]  # (n, 1, 2r+1)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    window = jnp.clip(rows, 0, h - 1) * w + jnp.clip(cols, 0, w - 1)
    return window.reshape(h * w, -1), inside.reshape(h * w, -1)


def propagate_frame(queue: Queue, target: jax.Array, grid_hw: tuple[int, int], *, topk: int = 5,
                    temperature: float = 0.1, radius: int | None = 12,
                    query_batch: int | None = None) -> tuple[Queue, jax.Array]:
    """DINO `label_propagation` for one target frame; returns the updated queue and its (n, K) soft labels.

    target: (n, C) features of the frame on the grid `grid_hw` (n = h·w, row-major); radius None or 0: no window.
    """
    h, w = grid_hw
    n = h * w
    num_classes = queue.labels.shape[-1]
    target = _normalize(target.astype(jnp.float32))
    window, inside = _neighbourhoods(h, w, radius)
    context_labels = queue.labels.reshape(-1, num_classes)

    def label_one_query(q):
        logits = (queue.features @ target[q] / temperature)[:, window[q]]  # (slots, M): the window around q
        keep = queue.valid[:, None] & inside[q][None, :]
        values, index = jax.lax.top_k(jnp.where(keep, logits, -jnp.inf).reshape(-1), topk)
        weights = jax.nn.softmax(values)  # = top-k affinities exp(cos/τ) normalised to sum 1
        slot, position = index // window.shape[1], window[q][index % window.shape[1]]
        return weights @ context_labels[slot * n + position]

    predicted = jax.lax.map(label_one_query, jnp.arange(n), batch_size=min(query_batch or n, n))  # (n, K)
    slot = 1 + (queue.frame - 1) % (queue.valid.shape[0] - 1)
    queue = Queue(queue.features.at[slot].set(target), queue.labels.at[slot].set(predicted),
                  queue.valid.at[slot].set(True), queue.frame + 1)
    return queue, predicted


@functools.partial(jax.jit, static_argnames=("n_last_frames", "topk", "temperature", "radius", "query_batch"))
def propagate(features: jax.Array, first_labels: jax.Array, *, n_last_frames: int = 7, topk: int = 5,
              temperature: float = 0.1, radius: int | None = 12, query_batch: int | None = None) -> jax.Array:
    """Propagate first-frame labels through a whole video: (T, h, w, C) features, (h, w, K) labels -> (T, h, w, K).

    Frame 0 of the output is `first_labels`. For evaluation runs use the frame-by-frame `propagate_frame`.
    """
    num_frames, h, w, channels = features.shape

    def step(queue, target):
        return propagate_frame(queue, target.reshape(h * w, channels), (h, w), topk=topk, temperature=temperature,
                               radius=radius, query_batch=query_batch)

    _, predicted = jax.lax.scan(step, init_queue(features[0], first_labels, n_last_frames), features[1:])
    first = first_labels.astype(jnp.float32).reshape(1, h * w, -1)
    return jnp.concatenate([first, predicted]).reshape(num_frames, h, w, -1)


def soft_to_labels(soft: jax.Array, stride: int, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """(h, w, K) soft labels -> (H_out, W_out) uint8: bilinear x`stride`, per-class min-max, arg-max, nearest resize.

    `rows`, `cols` are `nearest_indices((h·stride, w·stride), (H_out, W_out))`.
    """
    h, w, num_classes = soft.shape
    up = jax.image.resize(soft, (h * stride, w * stride, num_classes), method="linear")
    low, high = up.min(axis=(0, 1)), up.max(axis=(0, 1))
    # DINO divides by (max - min) unguarded; a constant positive class would give NaN there, here it stays as is.
    # All-zero classes (absent, or padding of the class axis) stay zero and never win an arg-max against class 0.
    scaled = jnp.where(high - low > 0, (up - low) / jnp.where(high - low > 0, high - low, 1), up)
    up = jnp.where(high > 0, scaled, up)
    return jnp.argmax(up, axis=-1).astype(jnp.uint8)[rows][:, cols]


@functools.partial(jax.jit, static_argnames=("stride", "n_last_frames", "topk", "temperature", "radius",
                                             "query_batch"))
def _segment(features, first_labels, rows, cols, *, stride, **kwargs):
    soft = propagate(features, first_labels, **kwargs)
    return jax.lax.map(lambda frame: soft_to_labels(frame, stride, rows, cols), soft[1:])


def knn_segment(features: jax.Array, first_annotation: np.ndarray, input_hw: tuple[int, int], *,
                n_last_frames: int = 7, topk: int = 5, temperature: float = 0.1, radius: int | None = 12,
                query_batch: int | None = 1024) -> np.ndarray:
    """Segment a video whose (T, h, w, C) features are all at hand, one stream (tests and small inputs).

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
    first = jax.nn.one_hot(resize_labels_nearest(first_annotation, (h, w)), int(first_annotation.max()) + 1)
    rows, cols = nearest_indices(tuple(input_hw), first_annotation.shape)
    labels = _segment(jnp.asarray(features), first, rows, cols, stride=input_hw[0] // h, n_last_frames=n_last_frames,
                      topk=topk, temperature=temperature, radius=radius, query_batch=query_batch)
    return np.concatenate([np.asarray(first_annotation, np.uint8)[None], np.asarray(labels)])
