"""AdaBins-style depth probe on frozen features, its losses and the NYUv2 metrics.

Head (after AdaBins, Bhat et al. CVPR 2021, shariqfarooq123/AdaBins models/unet_adaptive_bins.py and miniViT):
  - pixel embeddings e_i (E channels): conv3x3 of the FlowFeat features (the AdaBins "conv3x3" before the
    range-attention maps) plus a linear map of the encoder features upsampled bilinearly (see `DepthProbe.embed`);
    encoder-only: the linear map on the token grid, and the depth map is upsampled at the end;
  - tokens: a patch embedding conv (kernel = stride = `token_stride`) of the FlowFeat features, the AdaBins patch
    embedding, followed by the linearly embedded encoder patches; LayerNorm-ed, no positional encoding (the bins
    are a global summary, so token order does not matter);
  - 1 + Q learnable queries attend once to the tokens (one cross-attention block, as in the segmentation probe; it
    stands in for AdaBins' 4-layer transformer encoder whose first outputs play the same roles);
  - bin widths: attended query 0 -> MLP (E -> 256 -> LeakyReLU -> 256 -> LeakyReLU -> N) -> ReLU + 0.1 -> divided by
    its sum (AdaBins norm='linear', eps 0.1); edges = d_min + cumsum((d_max - d_min) * widths) starting at d_min,
    centres c_n = midpoints of consecutive edges;
  - range-attention maps R_iq = <e_i, y_q> for attended queries y_1..y_Q, then a 1x1 layer Q -> N and a softmax over
    bins p_in; depth d_i = sum_n p_in c_n.
Losses: scale-invariant log loss (AdaBins loss.py SILogLoss, Eigen et al. 2014 with lambda = 0.85, x10) plus a
gradient-matching loss on the log-depth residual (Li & Snavely, MegaDepth, CVPR 2018, one scale). AdaBins' chamfer
loss on the bin centres is not used (the FlowFeat paper names SI + gradient losses).
Metrics (AdaBins evaluate.py compute_errors): per image over valid pixels, then averaged over images.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowfeat_jax.probes.segmentation import CrossAttention, resize_bilinear


@dataclasses.dataclass(frozen=True)
class DepthProbeConfig:
    flowfeat_dim: int = 0  # FlowFeat channels (0 = not used)
    encoder_dim: int = 0  # encoder channels (0 = not used)
    num_bins: int = 256
    num_queries: int = 128  # range-attention maps (AdaBins n_query_channels)
    embed_dim: int = 128
    num_heads: int = 4
    token_stride: int = 16  # patch embedding stride on full-resolution features (AdaBins patch_size 16)
    min_depth: float = 1e-3
    max_depth: float = 10.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if not (self.flowfeat_dim or self.encoder_dim):
            raise ValueError("the depth probe needs FlowFeat features, encoder features or both")
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")


def bin_centres(widths: jax.Array, min_depth: float, max_depth: float) -> jax.Array:
    """Centres (B, N) of the adaptive bins from normalised widths (B, N) summing to 1 (AdaBins forward)."""
    edges = min_depth + jnp.cumsum((max_depth - min_depth) * widths, axis=-1)
    edges = jnp.concatenate([jnp.full_like(edges[:, :1], min_depth), edges], axis=-1)
    return 0.5 * (edges[:, :-1] + edges[:, 1:])


class DepthProbe(nnx.Module):
    """Depth (B, H, W) in metres and bin centres (B, N) from frozen features (see module docstring)."""

    def __init__(self, cfg: DepthProbeConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        types = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        width, stride = cfg.embed_dim, cfg.token_stride
        if cfg.flowfeat_dim:
            self.pixel_embed = nnx.Conv(cfg.flowfeat_dim, width, (3, 3), padding=1, **types)
            self.patch_embed = nnx.Conv(cfg.flowfeat_dim, width, (stride, stride), strides=stride, padding="VALID",
                                        **types)
        else:
            self.pixel_embed = self.patch_embed = None
        self.encoder_embed = nnx.Linear(cfg.encoder_dim, width, **types) if cfg.encoder_dim else None
        init = 0.1 * jax.random.normal(rngs.params(), (1, 1 + cfg.num_queries, width), cfg.param_dtype)
        self.queries = nnx.Param(init / width)
        self.token_norm = nnx.LayerNorm(width, **types)
        self.cross_attn = CrossAttention(width, cfg.num_heads, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                         rngs=rngs)
        self.regressor = nnx.List([nnx.Linear(width, 256, **types), nnx.Linear(256, 256, **types),
                                   nnx.Linear(256, cfg.num_bins, **types)])
        self.conv_out = nnx.Linear(cfg.num_queries, cfg.num_bins, **types)

    def embed(self, encoder: jax.Array | None, flowfeat: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Pixel embeddings (B, H, W, E) and tokens (B, T, E) of the inputs.

        With both inputs the pixel embedding is conv3x3(FlowFeat) + upsample(linear(encoder)), i.e. one layer over
        their concatenation whose encoder part is 1x1 (linear maps commute with bilinear upsampling), so the encoder
        channels are never upsampled; the tokens are the FlowFeat patches followed by the encoder patches.
        """
        pixels, tokens = None, []
        if self.cfg.flowfeat_dim:
            pixels = self.pixel_embed(flowfeat)
            patches = self.patch_embed(flowfeat)
            tokens.append(patches.reshape(patches.shape[0], -1, patches.shape[-1]))
        if self.cfg.encoder_dim:
            grid = self.encoder_embed(encoder)
            tokens.append(grid.reshape(grid.shape[0], -1, grid.shape[-1]))
            pixels = grid if pixels is None else pixels + resize_bilinear(grid, pixels.shape[1:3]).astype(pixels.dtype)
        return pixels, self.token_norm(jnp.concatenate(tokens, axis=1))

    def bin_widths(self, summary: jax.Array) -> jax.Array:
        """Normalised widths (B, N) from the summary query (B, E): MLP, ReLU + 0.1, divided by the sum."""
        h = jax.nn.leaky_relu(self.regressor[0](summary), 0.01)
        h = jax.nn.leaky_relu(self.regressor[1](h), 0.01)
        widths = jax.nn.relu(self.regressor[2](h).astype(jnp.float32)) + 0.1
        return widths / jnp.sum(widths, axis=-1, keepdims=True)

    def __call__(self, encoder: jax.Array | None, flowfeat: jax.Array | None,
                 out_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        pixels, tokens = self.embed(encoder, flowfeat)
        queries = jnp.broadcast_to(self.queries[...], (tokens.shape[0], *self.queries.shape[1:])).astype(tokens.dtype)
        attended = self.cross_attn(queries, tokens)  # (B, 1 + Q, E)
        centres = bin_centres(self.bin_widths(attended[:, 0]), self.cfg.min_depth, self.cfg.max_depth)
        range_maps = jnp.einsum("bhwe,bqe->bhwq", pixels, attended[:, 1:])
        probs = jax.nn.softmax(self.conv_out(range_maps).astype(jnp.float32), axis=-1)
        depth = jnp.einsum("bhwn,bn->bhw", probs, centres)
        return resize_bilinear(depth[..., None], out_hw)[..., 0], centres


def silog_loss(pred: jax.Array, target: jax.Array, valid: jax.Array, *, variance_focus: float = 0.85) -> jax.Array:
    """10 * sqrt(Var(g) + (1 - lambda) * mean(g)^2), g = log pred - log target over valid pixels (AdaBins SILogLoss).

    Var is the unbiased variance (torch.var) over all valid pixels of the batch. A 1e-8 under the root keeps the
    gradient finite at a perfect fit.
    """
    valid = valid.astype(jnp.float32)
    count = jnp.sum(valid)
    g = (jnp.log(jnp.maximum(pred, 1e-6)) - jnp.log(jnp.where(valid > 0, target, 1.0))) * valid
    mean = jnp.sum(g) / jnp.maximum(count, 1.0)
    var = jnp.sum(jnp.square(g - mean) * valid) / jnp.maximum(count - 1.0, 1.0)
    return 10.0 * jnp.sqrt(var + (1.0 - variance_focus) * jnp.square(mean) + 1e-8)


def gradient_loss(pred: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean |d/dx R| + mean |d/dy R| of R = log pred - log target over pixel pairs that are both valid (MegaDepth)."""
    residual = jnp.log(jnp.maximum(pred, 1e-6)) - jnp.log(jnp.where(valid, target, 1.0))
    total = 0.0
    for axis in (1, 2):
        n = residual.shape[axis]
        diff = jnp.abs(jnp.diff(residual, axis=axis))
        pair = (jax.lax.slice_in_dim(valid, 1, n, axis=axis) & jax.lax.slice_in_dim(valid, 0, n - 1, axis=axis))
        total = total + jnp.sum(diff * pair) / jnp.maximum(jnp.sum(pair), 1)
    return total


def valid_depth(target: jax.Array, min_depth: float, max_depth: float) -> jax.Array:
    """Pixels with a finite ground truth in (min_depth, max_depth) (AdaBins evaluate.py valid_mask)."""
    return jnp.isfinite(target) & (target > min_depth) & (target < max_depth)


def depth_errors(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """RMSE, AbsRel, delta < 1.25^k (k = 1, 2, 3) over matched 1-D arrays of valid pixels (AdaBins compute_errors)."""
    gt, pred = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    ratio = np.maximum(gt / pred, pred / gt)
    return {
        "rmse": float(np.sqrt(np.mean(np.square(gt - pred)))),
        "abs_rel": float(np.mean(np.abs(gt - pred) / gt)),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


def image_depth_errors(pred: np.ndarray, gt: np.ndarray, eval_mask: np.ndarray, *, min_depth: float = 1e-3,
                       max_depth: float = 10.0) -> dict[str, float] | None:
    """Errors of one (H, W) prediction, as AdaBins evaluates NYUv2: NaN -> min, inf -> max, clip to [min, max];
    pixels count where the ground truth is finite and in (min, max) and `eval_mask` (the Eigen crop) holds.
    Returns None when no pixel is valid (AdaBins counts such images as invalid and skips them)."""
    if pred.shape != gt.shape or gt.shape != eval_mask.shape:
        raise ValueError(f"prediction {pred.shape}, ground truth {gt.shape} and mask {eval_mask.shape} differ")
    pred = np.nan_to_num(np.asarray(pred, np.float64), nan=min_depth, posinf=max_depth, neginf=min_depth)
    pred = np.clip(pred, min_depth, max_depth)
    gt = np.asarray(gt, np.float64)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(gt) & (gt > min_depth) & (gt < max_depth) & eval_mask
    if not valid.any():
        return None
    return depth_errors(gt[valid], pred[valid])


def colorize_depth(depth: np.ndarray, max_depth: float = 10.0, invalid: np.ndarray | None = None) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8 turbo colour map on [0, max_depth]; `invalid` pixels black."""
    import cv2  # noqa: PLC0415  (OpenCV only for the depth pictures)

    scaled = np.clip(np.nan_to_num(np.asarray(depth, np.float64)) / max_depth, 0, 1)
    rgb = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1].copy()
    if invalid is not None:
        rgb[invalid] = 0
    return rgb
