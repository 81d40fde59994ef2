"""Semantic segmentation probe on frozen features: the attention probe of the reference, loss and mIoU metrics.

Mirrors tum-vision/flowfeat probes/attention.py. `CrossAttentionProbe`: C learnable class queries (initialised as
0.1 * N(0, 1) / dim) attend once to the feature tokens (8 heads, q/k/v projections without bias, output projection
with bias); the logit of class k at pixel i is the dot product of pixel feature x_i with the attended query y_k,
divided by the channel count C:  z_ik = <x_i, y_k> / C. Optional LayerNorms (`with_norm`, off in the reference
defaults) normalise features, queries and attended queries. `downscale` > 1 pools the FlowFeat keys/values bilinearly
first (the paper downsamples the FlowFeat maps inside the cross-attention for speed); the per-pixel dot product
still uses the full-resolution features. The encoder-only probe never pools its (already coarse) token grid.

Which features (the reference `AttentionProbing` with two inputs): for 'both' the encoder grid gets a linear (1x1)
classifier whose logits are upsampled bilinearly (align_corners=False) to the FlowFeat resolution and added to the
attention-probe logits of the FlowFeat features. Because bilinear upsampling is linear, this equals a linear map of
the upsampled encoder features concatenated with the FlowFeat features, with the attention probe in place of the
linear part on the FlowFeat channels. 'encoder' alone: the attention probe on the token grid, logits upsampled;
'flowfeat' alone: the attention probe on the FlowFeat features.
"""

from __future__ import annotations

import colorsys
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowfeat_jax.probes.data import IGNORE_LABEL


class CrossAttention(nnx.Module):
    """Multi-head attention of queries (B, Nq, D) over keys/values (B, Nk, D) (probes/attention.py CrossAttention)."""

    def __init__(self, dim: int, num_heads: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.projq = nnx.Linear(dim, dim, use_bias=False, **dense)
        self.projk = nnx.Linear(dim, dim, use_bias=False, **dense)
        self.projv = nnx.Linear(dim, dim, use_bias=False, **dense)
        self.proj = nnx.Linear(dim, dim, **dense)

    def __call__(self, queries: jax.Array, tokens: jax.Array) -> jax.Array:
        batch, num_queries, dim = queries.shape
        head_dim = dim // self.num_heads

        def heads(x):  # (B, N, D) -> (B, N, heads, D/heads)
            return x.reshape(x.shape[0], x.shape[1], self.num_heads, head_dim)

        q, k, v = heads(self.projq(queries)), heads(self.projk(tokens)), heads(self.projv(tokens))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, num_queries, dim)
        return self.proj(attended)


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize of (B, H, W, C) like torch F.interpolate(mode='bilinear', align_corners=False), no antialias."""
    if tuple(x.shape[1:3]) == tuple(out_hw):
        return x
    return jax.image.resize(x, (x.shape[0], *out_hw, x.shape[-1]), method="linear", antialias=False)


class CrossAttentionProbe(nnx.Module):
    """C class queries, one cross-attention block, per-pixel dot product -> logits (probes/attention.py)."""

    def __init__(self, dim: int, num_queries: int, *, num_heads: int = 8, with_norm: bool = False, downscale: int = 1,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.downscale = downscale
        init = 0.1 * jax.random.normal(rngs.params(), (1, num_queries, dim), param_dtype) / dim
        self.queries = nnx.Param(init)
        self.cross_attn = CrossAttention(dim, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # torch nn.LayerNorm default eps
        self.norm = nnx.LayerNorm(dim, **norm) if with_norm else None
        self.norm1 = nnx.LayerNorm(dim, **norm) if with_norm else None
        self.norm2 = nnx.LayerNorm(dim, **norm) if with_norm else None

    @staticmethod
    def _maybe(norm, x):
        return x if norm is None else norm(x)

    def __call__(self, features: jax.Array) -> jax.Array:
        """features (B, H, W, C) -> logits (B, H, W, num_queries)."""
        batch, height, width, channels = features.shape
        pooled = resize_bilinear(features, (height // self.downscale, width // self.downscale))
        tokens = self._maybe(self.norm, pooled.reshape(batch, -1, channels))
        queries = jnp.broadcast_to(self._maybe(self.norm1, self.queries[...]), (batch, *self.queries.shape[1:]))
        attended = self._maybe(self.norm2, self.cross_attn(queries.astype(tokens.dtype), tokens))  # (B, K, C)
        pixels = self._maybe(self.norm, features)
        return jnp.einsum("bhwc,bkc->bhwk", pixels, attended) / channels


@dataclasses.dataclass(frozen=True)
class SegmentationProbeConfig:
    """Widths of the inputs (0 = input not used) and the attention-probe options."""

    num_classes: int
    flowfeat_dim: int = 0
    encoder_dim: int = 0
    num_heads: int = 8
    with_norm: bool = False
    downscale: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if not (self.flowfeat_dim or self.encoder_dim):
            raise ValueError("the segmentation probe needs FlowFeat features, encoder features or both")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")


class SegmentationProbe(nnx.Module):
    """Logits (B, H, W, classes) from encoder features (B, h, w, C) and/or FlowFeat features (B, H, W, d)."""

    def __init__(self, cfg: SegmentationProbeConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        types = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        downscale = cfg.downscale if cfg.flowfeat_dim else 1  # the factor is for the FlowFeat maps only
        attention = dict(num_heads=cfg.num_heads, with_norm=cfg.with_norm, downscale=downscale, **types)
        attention_dim = cfg.flowfeat_dim or cfg.encoder_dim
        self.attention = CrossAttentionProbe(attention_dim, cfg.num_classes, rngs=rngs, **attention)
        both = cfg.flowfeat_dim and cfg.encoder_dim
        self.linear = nnx.Linear(cfg.encoder_dim, cfg.num_classes, rngs=rngs, **types) if both else None

    def __call__(self, encoder: jax.Array | None, flowfeat: jax.Array | None, out_hw: tuple[int, int]) -> jax.Array:
        if self.cfg.flowfeat_dim:
            logits = self.attention(flowfeat)
            if self.linear is not None:
                logits = logits + resize_bilinear(self.linear(encoder), logits.shape[1:3])
        else:
            logits = self.attention(encoder)
        return resize_bilinear(logits.astype(jnp.float32), out_hw)


def cross_entropy_ignore(logits: jax.Array, labels: jax.Array, ignore: int = IGNORE_LABEL) -> jax.Array:
    """Mean softmax cross-entropy over pixels whose label is not `ignore` (torch F.cross_entropy ignore_index)."""
    valid = labels != ignore
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def confusion_matrix(pred: jax.Array, labels: jax.Array, num_classes: int, ignore: int = IGNORE_LABEL) -> jax.Array:
    """(num_classes, num_classes) int32 counts, rows = ground truth, columns = prediction; `ignore` pixels skipped.

    Ground-truth ids outside 0..num_classes-1 (other than `ignore`) are skipped too; data loading rejects them.
    """
    labels = labels.astype(jnp.int32)
    valid = (labels != ignore) & (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + pred.astype(jnp.int32), 0)
    counts = jnp.bincount(index.ravel(), weights=valid.ravel().astype(jnp.int32), length=num_classes * num_classes)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray) -> dict[str, float | list[float]]:
    """mIoU (mean over classes with a non-empty union), pixel accuracy and per-class IoU (NaN: empty union)."""
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    total = confusion.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
        "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "iou": [float(v) for v in iou],
    }


def class_palette(num_classes: int) -> np.ndarray:
    """Distinct RGB colours (256, 3) uint8 for class ids (golden-ratio hues); index 255 (ignore) is black."""
    palette = np.zeros((256, 3), np.uint8)
    for k in range(num_classes):
        hue = (k * 0.618033988749895) % 1.0
        value = 0.95 if k % 2 == 0 else 0.7
        palette[k] = np.round(np.array(colorsys.hsv_to_rgb(hue, 0.75, value)) * 255)
    return palette


def colorize_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 picture; 255 (ignore) black."""
    return class_palette(num_classes)[np.asarray(labels, np.uint8)]
