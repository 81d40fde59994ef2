"""DPT decoder D of FlowFeat in Flax NNX, channels-last.

Mirrors the reference `model.py` (DecodeDPT, Postprocess) and `util/dpt_blocks.py` (ResidualConvUnit,
FeatureFusionBlock, LayerNormBCHW, _make_scratch); recipe.md "Model". Module names follow the reference so that
`flowfeat_jax/ports/dpt.py` maps every torch key to one NNX path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowfeat_jax.models.vit import ViTConfig

# Reassembly widths of the four hooked layers for MAE encoders, keyed by hidden size (reference load_encoder);
# DINO / DINOv2 encoders use their hidden size on all four paths.
_MAE_WIDTHS = {768: (96, 192, 384, 768), 1024: (256, 512, 1024, 1024)}


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    """DPT decoder configuration.

    Attributes:
      vit_dim: channel width C of the encoder tokens.
      widths: channels of the four reassembled layers (reference `CfgDPT.features`).
      features: scratch width and output width d (reference `DecodeDPT(dpt_cfg, fdim, fdim)`).
      patch_size: encoder patch size p; the token grid is (H/p, W/p).
    """

    vit_dim: int
    widths: tuple[int, int, int, int]
    features: int = 128
    patch_size: int = 16
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.widths) != 4:
            raise ValueError(f"DPTConfig.widths needs 4 entries, got {self.widths}")

    @classmethod
    def for_encoder(cls, vit_cfg: ViTConfig, features: int = 128) -> DPTConfig:
        """Decoder for an encoder config, widths as the reference `load_encoder` (recipe.md "Model")."""
        if vit_cfg.family == "mae":
            if vit_cfg.hidden_size not in _MAE_WIDTHS:
                raise ValueError(
                    f"no DPT widths for an MAE encoder of width {vit_cfg.hidden_size}; known: {list(_MAE_WIDTHS)}"
                )
            widths = _MAE_WIDTHS[vit_cfg.hidden_size]
        else:
            widths = (vit_cfg.hidden_size,) * 4
        return cls(
            vit_dim=vit_cfg.hidden_size,
            widths=widths,
            features=features,
            patch_size=vit_cfg.patch_size,
            dtype=vit_cfg.dtype,
            param_dtype=vit_cfg.param_dtype,
        )


def check_token_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Returns the token grid (H/p, W/p) of an image, or raises ValueError if the decoder cannot take it.

    The ÷2 path (postprocess4) is fused with the ×1 path after a ×2 upsampling, so both grid sides must be even,
    i.e. H and W multiples of 2p (recipe.md "Token grids").
    """
    step = 2 * patch_size
    if height % step == 0 and width % step == 0:
        return height // patch_size, width // patch_size

    def nearest(side: int) -> str:
        below, above = max(step, side // step * step), -(-side // step) * step
        return f"{below}" if below == above else f"{below} or {above}"

    raise ValueError(
        f"image size {height}x{width} does not fit patch size {patch_size}: height and width must be multiples of "
        f"{step} (an even token grid); nearest valid height {nearest(height)}, width {nearest(width)}"
    )


def _interpolation_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """(out, in) weights of 1-D linear interpolation with torch `F.interpolate(mode="bilinear")` source indices.

    align_corners=True:  src = dst · (in − 1)/(out − 1).
    align_corners=False: src = max((dst + ½) · in/out − ½, 0)   (size given, no scale_factor).
    Each output takes (1 − λ)·x[i0] + λ·x[i1] with i0 = ⌊src⌋, i1 = min(i0 + 1, in − 1), λ = src − i0.
    """
    # f32 scale and index arithmetic as torch's CPU kernel for f32 inputs; (dst + ½)·scale − ½ is one fused
    # multiply-add there, emulated by an exact f64 product rounded once to f32. Weights then match torch exactly.
    f32 = np.float32
    dst = np.arange(out_size)
    if align_corners:
        src = dst.astype(f32) * (f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0))
    else:
        scale = np.float64(f32(in_size) / f32(out_size))
        src = np.maximum((scale * (dst + 0.5) - 0.5).astype(f32), f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0.astype(f32)
    weights = np.zeros((out_size, in_size), f32)
    np.add.at(weights, (np.arange(out_size), i0), f32(1) - lam)
    np.add.at(weights, (np.arange(out_size), i1), lam)
    return weights


def _matrix_taps(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (rows, t): the nonzero entries of every row of `matrix`, padded with weight 0."""
    nonzero = [np.flatnonzero(row) for row in matrix]
    taps = max(1, max(len(n) for n in nonzero))
    indices = np.zeros((len(matrix), taps), np.int32)
    weights = np.zeros((len(matrix), taps), np.float32)
    for row, columns in enumerate(nonzero):
        indices[row, : len(columns)] = columns
        weights[row, : len(columns)] = matrix[row, columns]
    return indices, weights


def _apply_taps(x: jax.Array, indices: np.ndarray, weights: np.ndarray, axis: int) -> jax.Array:
    """Σ_k weights[:, k] · take(x, indices[:, k], axis): a banded matrix applied along one axis by gathers; sums in
    f32 (as a matmul would accumulate), result in x's dtype."""
    shape = [1] * x.ndim
    shape[axis] = len(indices)
    out = None
    for k in range(indices.shape[1]):
        term = jnp.take(x, indices[:, k], axis=axis).astype(jnp.float32) * weights[:, k].reshape(shape)
        out = term if out is None else out + term
    return out.astype(x.dtype)


def resample_axis(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
    """`matrix` (out, in) applied along `axis` of x, for sparse (banded) resampling matrices.

    Forward and backward both gather the few nonzero taps (of the matrix, then of its transpose): a dense einsum
    costs in·out multiply-adds per column (180 ms forward at 4·128²→224², 128 channels, on 2 CPU threads, vs 47 ms),
    and autodiff of a gather would scatter-add (slow on CPU).
    """
    forward_taps, transpose_taps = _matrix_taps(matrix), _matrix_taps(matrix.T)

    @jax.custom_vjp
    def resample(x):
        return _apply_taps(x, *forward_taps, axis)

    def resample_fwd(x):
        return resample(x), None

    def resample_bwd(_, grad_out):
        return (_apply_taps(grad_out, *transpose_taps, axis),)

    resample.defvjp(resample_fwd, resample_bwd)
    return resample(x)


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int], *, align_corners: bool) -> jax.Array:
    """Bilinear resize of (B, H, W, C) to (B, Ho, Wo, C), equal to torch `F.interpolate(mode="bilinear")`.

    Separable: the 2-tap interpolation matrices applied along H, then W (`resample_axis`); no antialiasing (torch's
    default), so it matches torch for up- and downsampling alike. FeatureFusionBlock uses align_corners=True, the
    final resize align_corners=False.
    """
    x = resample_axis(x, _interpolation_matrix(x.shape[1], out_hw[0], align_corners), axis=1)
    return resample_axis(x, _interpolation_matrix(x.shape[2], out_hw[1], align_corners), axis=2)


def _torch_uniform_init(fan_in: int) -> nnx.Initializer:
    """U(−1/√fan_in, 1/√fan_in): torch's default Conv weight (kaiming_uniform, a = √5) and bias init."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --------------------------------------------------------------------------------------------------------------------
# Convolutions. XLA:CPU lowers the weight gradient of a convolution to a convolution whose kernel is the output
# gradient (H×W wide), which runs far below matmul speed on large maps: at B·H·W = 4·224², 128 channels, 1.0 s for
# a 1×1 kernel vs 72 ms as one matmul; 3×3 at 4·224², 128 channels, 2.8 s vs 0.65 s as 9 tap matmuls; a ConvTranspose
# 4×4/4 at 4·16², 384 channels, 2.2 s for forward+backward vs 0.14 s as one matmul (2 threads). So 1×1 convolutions
# and the patch upsampling are written as matmuls everywhere, and large 3×3 weight gradients are taken per tap on CPU.
# --------------------------------------------------------------------------------------------------------------------

# That convolution slows down once its kernel, the output gradient, outgrows the caches. Ratio of its time to
# `tap_weight_grad`'s (2 threads), by output-gradient elements B·H·W·Cout: below 2^22 0.5–1.03 (19 shapes, 64–384
# channels, sides 56–224); from 2^22 1.07–1.35, from 2^23 2.8–4.3 (4·224², 128 channels: 2.8 s vs 0.65 s). Taps from
# 2^22 on.
_TAP_WEIGHT_GRAD_MIN_ELEMENTS = 2**22


def _lax_same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def tap_weight_grad(x: jax.Array, grad_out: jax.Array, kernel_size: int) -> jax.Array:
    """Weight gradient (k, k, Cin, Cout) of a stride-1 'same' convolution as k² matmuls (B·H·W, Cin)ᵀ @ (B·H·W, Cout),
    one per kernel tap, accumulated in f32. A loop, not k² unrolled matmuls: XLA then holds one shifted window at a
    time (198 MB of scratch instead of 884 MB at 4·224², 128 channels)."""
    batch, height, width, cin = x.shape
    pad = kernel_size // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1])

    def add_tap(tap, taps):
        window = jax.lax.dynamic_slice(padded, (0, tap // kernel_size, tap % kernel_size, 0),
                                       (batch, height, width, cin))
        product = jnp.matmul(window.reshape(-1, cin).T, grad_rows, preferred_element_type=jnp.float32)
        return taps.at[tap].set(product)

    taps = jnp.zeros((kernel_size * kernel_size, cin, grad_rows.shape[-1]), jnp.float32)
    taps = jax.lax.fori_loop(0, kernel_size * kernel_size, add_tap, taps)
    return taps.reshape(kernel_size, kernel_size, cin, -1).astype(x.dtype)


@jax.custom_vjp
def _spatial_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _lax_same_conv(x, kernel)


def _spatial_conv_fwd(x, kernel):
    return _lax_same_conv(x, kernel), (x, kernel)


def _spatial_conv_bwd(residuals, grad_out):
    x, kernel = residuals
    grad_x = jax.vjp(lambda inputs: _lax_same_conv(inputs, kernel), x)[1](grad_out)[0]

    def xla_weight_grad(x, grad_out):
        return jax.vjp(lambda weights: _lax_same_conv(x, weights), kernel)[1](grad_out)[0]

    if grad_out.size < _TAP_WEIGHT_GRAD_MIN_ELEMENTS:
        return grad_x, xla_weight_grad(x, grad_out)
    grad_kernel = jax.lax.platform_dependent(
        x, grad_out, cpu=lambda x, g: tap_weight_grad(x, g, kernel.shape[0]), default=xla_weight_grad
    )
    return grad_x, grad_kernel


_spatial_conv.defvjp(_spatial_conv_fwd, _spatial_conv_bwd)


def same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 convolution with torch padding k // 2 of x (B, H, W, Cin) by kernel (k, k, Cin, Cout), k odd.

    1×1 is one 2-D matmul (so its weight gradient is one too); larger kernels are lax convolutions whose weight
    gradient comes from `tap_weight_grad` on CPU from `_TAP_WEIGHT_GRAD_MIN_ELEMENTS` on.
    """
    if kernel.shape[0] == 1:
        rows = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[2:])
        return rows.reshape(*x.shape[:-1], kernel.shape[-1])
    return _spatial_conv(x, kernel)


def patch_upsample(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """torch ConvTranspose2d with kernel = stride = f, padding 0, on x (B, h, w, Cin) with kernel (f, f, Cout, Cin):
    every token becomes an f×f patch, out[b, f·i + u, f·j + v] = kernel[u, v] @ x[b, i, j] — one matmul, then a
    depth-to-space shuffle (no zero-dilated convolution)."""
    batch, height, width, cin = x.shape
    factor, _, cout, _ = kernel.shape
    patches = x.reshape(-1, cin) @ kernel.reshape(-1, cin).T  # (B·h·w, f·f·Cout)
    patches = patches.reshape(batch, height, width, factor, factor, cout)
    return patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height * factor, width * factor, cout)


class Conv(nnx.Module):
    """Stride-1 k×k convolution with torch padding k // 2 (`same_conv`); HWIO `kernel` and `bias` as nnx.Conv, with
    torch's default init U(±1/√(Cin·k²))."""

    def __init__(self, cfg: DPTConfig, in_features: int, out_features: int, kernel: int, *, rngs: nnx.Rngs,
                 bias: bool = True):
        init = _torch_uniform_init(in_features * kernel * kernel)
        self.dtype = cfg.dtype
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, in_features, out_features), cfg.param_dtype))
        self.bias = nnx.Param(init(rngs.params(), (out_features,), cfg.param_dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = same_conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class PatchUpsample(nnx.Module):
    """ConvTranspose2d k = stride = factor, padding 0 (postprocess1/2) by `patch_upsample`. Its (k, k, out, in)
    kernel is the torch (in, out, k, k) weight permuted by (2, 3, 1, 0), the layout of
    nnx.ConvTranspose(transpose_kernel=True); init as torch, which takes fan_in from weight dim 1 (= out)."""

    def __init__(self, cfg: DPTConfig, features: int, factor: int, *, rngs: nnx.Rngs):
        init = _torch_uniform_init(features * factor * factor)
        self.dtype = cfg.dtype
        self.kernel = nnx.Param(init(rngs.params(), (factor, factor, features, features), cfg.param_dtype))
        self.bias = nnx.Param(init(rngs.params(), (features,), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = patch_upsample(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


def _strided_conv(cfg: DPTConfig, features: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    """3×3 stride-2 conv with torch padding 1 and torch's default init (postprocess4); small, left to lax."""
    init = _torch_uniform_init(features * 9)
    return nnx.Conv(features, features, (3, 3), strides=(2, 2), padding=[(1, 1)] * 2, kernel_init=init,
                    bias_init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class Postprocess(nnx.Module):
    """Reassembles one hooked token grid: conv1×1 vit_dim → width, then an optional resampling layer.

    Mirrors model.py Postprocess (`post.0` = project, `post.1` = resample); no activation in between.
    """

    def __init__(self, cfg: DPTConfig, width: int, resample: str | None, *, rngs: nnx.Rngs):
        self.project = Conv(cfg, cfg.vit_dim, width, 1, rngs=rngs)
        if resample == "up4":
            self.resample = PatchUpsample(cfg, width, 4, rngs=rngs)
        elif resample == "up2":
            self.resample = PatchUpsample(cfg, width, 2, rngs=rngs)
        elif resample == "down2":
            self.resample = _strided_conv(cfg, width, rngs=rngs)
        else:
            self.resample = None

    def __call__(self, grid: jax.Array) -> jax.Array:  # (B, h, w, C) -> (B, s·h, s·w, width)
        x = self.project(grid)
        return x if self.resample is None else self.resample(x)


class ResidualConvUnit(nnx.Module):
    """relu(x) + conv2(relu(conv1(relu(x)))), both convs 3×3 with bias (dpt_blocks.py ResidualConvUnit).

    The reference applies `nn.ReLU(inplace=True)` to its input before `out + x`, so the skip carries relu(x),
    not x; the released weights were trained with that, so it is reproduced here.
    """

    def __init__(self, cfg: DPTConfig, *, rngs: nnx.Rngs):
        self.conv1 = Conv(cfg, cfg.features, cfg.features, 3, rngs=rngs)
        self.conv2 = Conv(cfg, cfg.features, cfg.features, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(x)
        return x + self.conv2(nnx.relu(self.conv1(x)))


class FeatureFusionBlock(nnx.Module):
    """(x + unit1(lateral)) → unit2 → bilinear ×2 with align_corners=True (dpt_blocks.py FeatureFusionBlock).

    refinenet4 has no lateral input: its residual_unit1 holds weights (they are in the reference state dict) but
    is never applied.
    """

    def __init__(self, cfg: DPTConfig, *, rngs: nnx.Rngs):
        self.residual_unit1 = ResidualConvUnit(cfg, rngs=rngs)
        self.residual_unit2 = ResidualConvUnit(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, lateral: jax.Array | None = None) -> jax.Array:
        if lateral is not None:
            x = x + self.residual_unit1(lateral)
        x = self.residual_unit2(x)
        return resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)


class DPT(nnx.Module):
    """DPT decoder D: four hooked token grids → (B, H, W, features) LayerNorm'ed pixel features.

    Mirrors model.py DecodeDPT.forward (with_norm=True). Spatial sizes for a (h, w) token grid: layers 1..4 at
    4h, 2h, h, h/2; fusion doubles each path, so path_1 is at 8h; output_conv0 there, bilinear resize to (H, W),
    output_conv1 (conv3×3 → ReLU → conv1×1), LayerNorm over channels (eps 1e-6, LayerNormBCHW).
    """

    def __init__(self, cfg: DPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        w, d = cfg.widths, cfg.features
        self.act_postprocess1 = Postprocess(cfg, w[0], "up4", rngs=rngs)
        self.act_postprocess2 = Postprocess(cfg, w[1], "up2", rngs=rngs)
        self.act_postprocess3 = Postprocess(cfg, w[2], None, rngs=rngs)
        self.act_postprocess4 = Postprocess(cfg, w[3], "down2", rngs=rngs)
        self.layer1_rn = Conv(cfg, w[0], d, 3, rngs=rngs, bias=False)
        self.layer2_rn = Conv(cfg, w[1], d, 3, rngs=rngs, bias=False)
        self.layer3_rn = Conv(cfg, w[2], d, 3, rngs=rngs, bias=False)
        self.layer4_rn = Conv(cfg, w[3], d, 3, rngs=rngs, bias=False)
        self.refinenet4 = FeatureFusionBlock(cfg, rngs=rngs)
        self.refinenet3 = FeatureFusionBlock(cfg, rngs=rngs)
        self.refinenet2 = FeatureFusionBlock(cfg, rngs=rngs)
        self.refinenet1 = FeatureFusionBlock(cfg, rngs=rngs)
        self.output_conv0 = Conv(cfg, d, d, 3, rngs=rngs)
        self.output_conv1a = Conv(cfg, d, d, 3, rngs=rngs)
        self.output_conv1b = Conv(cfg, d, d, 1, rngs=rngs)
        self.norm = nnx.LayerNorm(d, epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, hooked: Sequence[jax.Array], out_hw: tuple[int, int]) -> jax.Array:
        """Decodes hooked patch grids, each (B, h, w, vit_dim) with (h, w) = out_hw / p, to (B, H, W, features)."""
        height, width = int(out_hw[0]), int(out_hw[1])
        grid = check_token_grid(height, width, self.cfg.patch_size)
        if len(hooked) != 4:
            raise ValueError(f"DPT needs 4 hooked grids, got {len(hooked)}")
        for k, x in enumerate(hooked):
            if x.ndim != 4 or tuple(x.shape[1:]) != (*grid, self.cfg.vit_dim):
                raise ValueError(
                    f"hooked grid {k} has shape {tuple(x.shape)}; expected (B, {grid[0]}, {grid[1]}, "
                    f"{self.cfg.vit_dim}) for output size {height}x{width}, patch size {self.cfg.patch_size}"
                )
        layer_1 = self.layer1_rn(self.act_postprocess1(hooked[0]))
        layer_2 = self.layer2_rn(self.act_postprocess2(hooked[1]))
        layer_3 = self.layer3_rn(self.act_postprocess3(hooked[2]))
        layer_4 = self.layer4_rn(self.act_postprocess4(hooked[3]))

        path_4 = self.refinenet4(layer_4)
        path_3 = self.refinenet3(path_4, layer_3)
        path_2 = self.refinenet2(path_3, layer_2)
        path_1 = self.refinenet1(path_2, layer_1)

        out = resize_bilinear(self.output_conv0(path_1), (height, width), align_corners=False)
        out = self.output_conv1b(nnx.relu(self.output_conv1a(out)))
        return self.norm(out)
