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

from flowfeat_jax.models import ops
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
      remat: recompute each stage (reassembly, fusion blocks, output head) in the backward pass instead of keeping
        its activations: peak memory of the student pass for about one more decoder forward.
    """

    vit_dim: int
    widths: tuple[int, int, int, int]
    features: int = 128
    patch_size: int = 16
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

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


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int], *, align_corners: bool) -> jax.Array:
    """Bilinear resize of (B, H, W, C) to (B, Ho, Wo, C), equal to torch `F.interpolate(mode="bilinear")`.

    Separable: the 2-tap interpolation matrices applied along H, then W (`ops.resample_axis`); no antialiasing (torch's
    default), so it matches torch for up- and downsampling alike. FeatureFusionBlock uses align_corners=True, the
    final resize align_corners=False.
    """
    x = ops.resample_axis(x, _interpolation_matrix(x.shape[1], out_hw[0], align_corners), axis=1)
    return ops.resample_axis(x, _interpolation_matrix(x.shape[2], out_hw[1], align_corners), axis=2)


def _torch_uniform_init(fan_in: int) -> nnx.Initializer:
    """U(−1/√fan_in, 1/√fan_in): torch's default Conv weight (kaiming_uniform, a = √5) and bias init."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nnx.Module):
    """Stride-1 k×k convolution with torch padding k // 2 (`ops.same_conv`); HWIO `kernel` and `bias` as nnx.Conv, with
    torch's default init U(±1/√(Cin·k²))."""

    def __init__(self, cfg: DPTConfig, in_features: int, out_features: int, kernel: int, *, rngs: nnx.Rngs,
                 bias: bool = True):
        init = _torch_uniform_init(in_features * kernel * kernel)
        self.dtype = cfg.dtype
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, in_features, out_features), cfg.param_dtype))
        self.bias = nnx.Param(init(rngs.params(), (out_features,), cfg.param_dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = ops.same_conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class PatchUpsample(nnx.Module):
    """ConvTranspose2d k = stride = factor, padding 0 (postprocess1/2) by `ops.patch_upsample`. Its (k, k, out, in)
    kernel is the torch (in, out, k, k) weight permuted by (2, 3, 1, 0), the layout of
    nnx.ConvTranspose(transpose_kernel=True); init as torch, which takes fan_in from weight dim 1 (= out)."""

    def __init__(self, cfg: DPTConfig, features: int, factor: int, *, rngs: nnx.Rngs):
        init = _torch_uniform_init(features * factor * factor)
        self.dtype = cfg.dtype
        self.kernel = nnx.Param(init(rngs.params(), (factor, factor, features, features), cfg.param_dtype))
        self.bias = nnx.Param(init(rngs.params(), (features,), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = ops.patch_upsample(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
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
        stage = self._stage
        layer_1 = stage(lambda post, rn, x: rn(post(x)), self.act_postprocess1, self.layer1_rn, hooked[0])
        layer_2 = stage(lambda post, rn, x: rn(post(x)), self.act_postprocess2, self.layer2_rn, hooked[1])
        layer_3 = stage(lambda post, rn, x: rn(post(x)), self.act_postprocess3, self.layer3_rn, hooked[2])
        layer_4 = stage(lambda post, rn, x: rn(post(x)), self.act_postprocess4, self.layer4_rn, hooked[3])

        path_4 = stage(lambda block, x: block(x), self.refinenet4, layer_4)
        path_3 = stage(lambda block, x, lateral: block(x, lateral), self.refinenet3, path_4, layer_3)
        path_2 = stage(lambda block, x, lateral: block(x, lateral), self.refinenet2, path_3, layer_2)
        path_1 = stage(lambda block, x, lateral: block(x, lateral), self.refinenet1, path_2, layer_1)

        def head(decoder, x):
            out = resize_bilinear(decoder.output_conv0(x), (height, width), align_corners=False)
            return decoder.output_conv1b(nnx.relu(decoder.output_conv1a(out)))

        out = stage(head, self, path_1)
        # The LayerNorm is recomputed in the backward pass in any case: flax normalises in f32 and would keep three
        # f32 full-resolution maps ((x − mean), its square, x̂) for it, in bf16 as much as the rest of the decoder.
        return nnx.remat(lambda norm, x: norm(x))(self.norm, out)

    def _stage(self, fn, *args):
        """fn(*args), under nnx.remat when `cfg.remat` (its activations recomputed in the backward pass)."""
        return nnx.remat(fn)(*args) if self.cfg.remat else fn(*args)
