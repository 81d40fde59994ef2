"""ViT encoders of FlowFeat: DINO ViT-S/16, B/16, DINOv2 ViT-S/B/L/g 14 (with or without registers), MAE ViT-B/L 16.

One pre-norm transformer covers all three families (recipe "Backbones"); they differ only in layer scale (DINOv2),
SwiGLU (DINOv2 giant), register tokens, LayerNorm eps and how the stored position table is resized to the token grid.
Module names follow the torch-hub DINO/DINOv2 code (`patch_embed.proj`, `blocks.N.attn.qkv`, `ls1.gamma`, `norm`)
so that port tables map one-to-one. Weights come from `flowfeat_jax.ports.registry.from_pretrained`.

Images are NHWC, ImageNet-normalised (recipe "Image normalisation").
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowfeat_jax.models import ops

# Bicubic convolution constants used by torch: plain `F.interpolate(mode="bicubic")` uses a = -0.75, the antialiased
# path (`antialias=True`) uses Keys' a = -0.5 to match PIL. jax.image.resize uses a = -0.5 without torch's boundary
# handling, so it matches neither.
_CUBIC_A = -0.75
_CUBIC_A_ANTIALIAS = -0.5
# torch-hub DINO/DINOv2 (no registers) add 0.1 to the target grid and call interpolate with a scale factor
# (facebookresearch/dino issue #8); the hub registers models use an output size instead.
_HUB_INTERPOLATE_OFFSET = 0.1


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """One ViT encoder. `pos_grid` is the side of the stored (square) position table, `mlp_dim` the MLP hidden width
    (for SwiGLU, the width of each of the gate/up halves)."""

    family: str  # 'dinov2' | 'dino' | 'mae'
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_registers: int = 0
    layer_scale: bool = False
    swiglu: bool = False
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    pos_grid: int = 14
    pos_interp: str = "hf"  # 'hf' (transformers 5) | 'hub' (torch-hub DINO/DINOv2)
    pos_antialias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.family not in ("dinov2", "dino", "mae"):
            raise ValueError(f"ViTConfig.family must be 'dinov2', 'dino' or 'mae', got {self.family!r}")
        if self.pos_interp not in ("hf", "hub"):
            raise ValueError(f"ViTConfig.pos_interp must be 'hf' or 'hub', got {self.pos_interp!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus register tokens, which precede the patch tokens in every sequence."""
        return 1 + self.num_registers

    @classmethod
    def _dinov2(cls, hidden_size, num_layers, num_heads, mlp_dim, registers, **overrides):
        # DINOv2 checkpoints: 518 px at patch 14 -> 37x37 table; registers models resize it antialiased.
        base = cls(family="dinov2", patch_size=14, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                   mlp_dim=mlp_dim, num_registers=4 if registers else 0, layer_scale=True, layer_norm_eps=1e-6,
                   pos_grid=37, pos_antialias=registers)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def dinov2_vits14(cls, registers: bool = False, **overrides) -> "ViTConfig":
        return cls._dinov2(384, 12, 6, 1536, registers, **overrides)

    @classmethod
    def dinov2_vitb14(cls, registers: bool = False, **overrides) -> "ViTConfig":
        return cls._dinov2(768, 12, 12, 3072, registers, **overrides)

    @classmethod
    def dinov2_vitl14(cls, registers: bool = False, **overrides) -> "ViTConfig":
        return cls._dinov2(1024, 24, 16, 4096, registers, **overrides)

    @classmethod
    def dinov2_vitg14(cls, registers: bool = False, **overrides) -> "ViTConfig":
        # SwiGLU width: two thirds of 4 * 1536, rounded up to a multiple of 8 = 4096.
        return cls._dinov2(1536, 40, 24, 4096, registers, swiglu=True, **overrides)

    @classmethod
    def _patch16(cls, family, hidden_size, num_layers, num_heads, **overrides):
        # 224 px at patch 16 -> 14x14 table; eps 1e-6 as the original DINO/MAE code (HF configs may say 1e-12 and
        # from_pretrained then uses theirs).
        base = cls(family=family, patch_size=16, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                   mlp_dim=4 * hidden_size, layer_norm_eps=1e-6, pos_grid=14)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def dino_vits16(cls, **overrides) -> "ViTConfig":
        return cls._patch16("dino", 384, 12, 6, **overrides)

    @classmethod
    def dino_vitb16(cls, **overrides) -> "ViTConfig":
        return cls._patch16("dino", 768, 12, 12, **overrides)

    @classmethod
    def mae_vitb16(cls, **overrides) -> "ViTConfig":
        return cls._patch16("mae", 768, 12, 12, **overrides)

    @classmethod
    def mae_vitl16(cls, **overrides) -> "ViTConfig":
        return cls._patch16("mae", 1024, 24, 16, **overrides)


class ViTOutput(NamedTuple):
    """Encoder outputs; T = num_prefix_tokens + h * w tokens of width C."""

    hidden_states: tuple  # (B, T, C) raw block outputs, one per requested hook
    last_hidden_state: jax.Array  # (B, T, C) final LayerNorm of the last block that ran
    grid: tuple  # (h, w) token grid


# --------------------------------------------------------------------------------------------------------------------
# Position-table resizing: torch's bicubic kernels written as separable resampling matrices.
# --------------------------------------------------------------------------------------------------------------------


def _cubic_weight(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel W(x) for parameter a (W(0) = 1, W(+-1) = W(+-2) = 0)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _source_scale(in_size: int, out_size: int, scale_factor: float | None) -> float:
    """torch area_pixel_compute_scale for align_corners=False: 1/scale_factor when one is given, else in/out."""
    return 1.0 / scale_factor if scale_factor is not None and scale_factor > 0 else in_size / out_size


def bicubic_resize_matrix(in_size: int, out_size: int, *, scale_factor: float | None = None,
                          antialias: bool = False) -> np.ndarray:
    """Matrix R (out_size, in_size) with R @ x == torch 1-D bicubic resize of x (align_corners=False).

    Mirrors ATen's separable CPU kernels (UpSampleKernel.cpp, HelperInterpCubic):
    - plain: source coordinate s_i = scale * (i + 1/2) - 1/2, i0 = min(floor(s_i), n - 1), t = clip(s_i - i0, 0, 1);
      taps i0-1 .. i0+2 with weights W(t+1), W(t), W(1-t), W(2-t) (a = -0.75), indices clamped to [0, n-1]
      (edge replication).
    - antialias: centre c_i = scale * (i + 1/2), support = 2 * max(scale, 1); taps j in [trunc(c - support + 1/2),
      trunc(c + support + 1/2)) cut to [0, n), weight W((j - c + 1/2) / max(scale, 1)) with a = -0.5, then
      normalised to sum 1 (so borders are renormalised, not replicated). An axis whose size does not change is left
      as is (ATen's separable AA kernel skips it, even when a scale factor != 1 was given).
    `scale` is 1/scale_factor when a scale factor is given (torch passes it through unless recompute_scale_factor),
    else in_size/out_size.
    """
    scale = _source_scale(in_size, out_size, scale_factor)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if not antialias:
        source = scale * (rows + 0.5) - 0.5
        first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
        t = np.clip(source - first, 0.0, 1.0)
        for offset in (-1, 0, 1, 2):  # tap at first + offset lies |t - offset| from the source coordinate
            np.add.at(matrix, (rows, np.clip(first + offset, 0, in_size - 1)), _cubic_weight(t - offset, _CUBIC_A))
        return matrix
    if out_size == in_size:
        return np.eye(in_size)  # the antialiased kernel skips axes whose size does not change, whatever the scale
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    for i in rows:
        centre = scale * (i + 0.5)
        lo = max(math.trunc(centre - support + 0.5), 0)
        hi = min(math.trunc(centre + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weight = _cubic_weight((taps - centre + 0.5) / stretch, _CUBIC_A_ANTIALIAS)
        total = weight.sum()
        matrix[i, lo:hi] = weight / total if total != 0 else weight
    return matrix


def resize_pos_table(table: jax.Array, grid: tuple[int, int], *, mode: str, antialias: bool) -> jax.Array:
    """Resize a square (M, M, C) position table to the token grid (h, w), in f32, as the chosen torch code does.

    mode 'hf' (transformers 5 Dinov2/Dinov2WithRegisters/ViT/ViTMAE `interpolate_pos_encoding`): bicubic to
    size (h, w); antialiased for Dinov2WithRegisters. mode 'hub' (torch-hub dino/dinov2 vision_transformer.py): without
    antialias, scale_factor ((h + 0.1)/M, (w + 0.1)/M); with antialias (hub registers models, offset 0) size (h, w).
    Both return the table unchanged when the grid already is M x M.
    """
    side = table.shape[0]
    if tuple(grid) == (side, side):
        return table
    use_offset = mode == "hub" and not antialias
    rows, cols = (
        bicubic_resize_matrix(side, n, antialias=antialias,
                              scale_factor=(n + _HUB_INTERPOLATE_OFFSET) / side if use_offset else None)
        for n in grid
    )
    table = table.astype(jnp.float32)
    return jnp.einsum("hm,mnc,wn->hwc", jnp.asarray(rows, jnp.float32), table, jnp.asarray(cols, jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


def _linear(cfg: ViTConfig, d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def _layer_norm(cfg: ViTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         rngs=rngs)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> hidden_size channels (a stride-p convolution)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(3, cfg.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID",
                             dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.proj(images)  # (B, h, w, C)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused q|k|v projection (hub `attn.qkv`, `attn.proj`)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.qkv = _linear(cfg, cfg.hidden_size, 3 * cfg.hidden_size, rngs, use_bias=cfg.qkv_bias)
        self.proj = _linear(cfg, cfg.hidden_size, cfg.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        out = ops.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # (B, T, N, D)
        return self.proj(out.reshape(batch, length, width))


class LayerScale(nnx.Module):
    """Per-channel residual-branch scale (DINOv2 `ls1`/`ls2`)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        del rngs
        self.gamma = nnx.Param(jnp.ones((cfg.hidden_size,), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg, cfg.hidden_size, cfg.mlp_dim, rngs)
        self.fc2 = _linear(cfg, cfg.mlp_dim, cfg.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ops.gelu(self.fc1(x)))


class SwiGLU(nnx.Module):
    """w3(silu(gate) * up) with [gate | up] = w12(x) fused, as DINOv2 giant (hub SwiGLUFFNFused)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.w12 = _linear(cfg, cfg.hidden_size, 2 * cfg.mlp_dim, rngs)
        self.w3 = _linear(cfg, cfg.mlp_dim, cfg.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(gate) * up)


class Block(nnx.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ls1 = LayerScale(cfg, rngs=rngs) if cfg.layer_scale else None
        self.norm2 = _layer_norm(cfg, rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs) if cfg.swiglu else Mlp(cfg, rngs=rngs)
        self.ls2 = LayerScale(cfg, rngs=rngs) if cfg.layer_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        branch = self.attn(self.norm1(x))
        x = x + (self.ls1(branch) if self.ls1 is not None else branch)
        branch = self.mlp(self.norm2(x))
        return x + (self.ls2(branch) if self.ls2 is not None else branch)


# Every encoder family (ViT, DINOv3, ...) was pre-trained on ImageNet-normalised RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(frames_uint8: jax.Array) -> jax.Array:
    """uint8 RGB (B, H, W, 3) -> float32 ImageNet-normalised (recipe.md "Image normalisation")."""
    x = frames_uint8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def check_image_size(height: int, width: int, patch_size: int) -> None:
    """Raise a ValueError naming the size and the nearest valid sizes unless both sides are multiples of the patch."""
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        def near(n):
            return max(patch_size, round(n / patch_size) * patch_size)

        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}; "
                         f"nearest valid size: {near(height)}x{near(width)}")


class ViT(nnx.Module):
    """ViT encoder: patch embedding + [class, registers, patches] tokens + blocks + final LayerNorm `norm`."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c = cfg.hidden_size
        init = nnx.initializers.truncated_normal(0.02)
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, c), cfg.param_dtype))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + cfg.pos_grid**2, c), cfg.param_dtype))
        self.register_tokens = (
            nnx.Param(init(rngs.params(), (1, cfg.num_registers, c), cfg.param_dtype)) if cfg.num_registers else None
        )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = _layer_norm(cfg, rngs)

    def embed(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        """Token sequence (B, 1 + R + h*w, C) before the first block, and the grid (h, w).

        Position embeddings are added to class and patch tokens only; registers go in after, between them
        (transformers Dinov2WithRegistersEmbeddings, hub DinoVisionTransformer.prepare_tokens_with_masks).
        """
        cfg = self.cfg
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ViT expects images (B, H, W, 3) NHWC, got shape {images.shape}")
        check_image_size(images.shape[1], images.shape[2], cfg.patch_size)
        patches = self.patch_embed(images.astype(cfg.dtype))
        batch, h, w, c = patches.shape
        pos = self.pos_embed[...]
        patch_pos = resize_pos_table(pos[0, 1:].reshape(cfg.pos_grid, cfg.pos_grid, c), (h, w),
                                     mode=cfg.pos_interp, antialias=cfg.pos_antialias)
        patches = patches.reshape(batch, h * w, c) + patch_pos.reshape(1, h * w, c).astype(cfg.dtype)
        cls = jnp.broadcast_to((self.cls_token[...] + pos[:, :1]).astype(cfg.dtype), (batch, 1, c))
        parts = [cls]
        if self.register_tokens is not None:
            parts.append(jnp.broadcast_to(self.register_tokens[...].astype(cfg.dtype), (batch, cfg.num_registers, c)))
        parts.append(patches)
        return jnp.concatenate(parts, axis=1), (h, w)

    def __call__(self, images: jax.Array, *, hooks: Sequence[int] | None = None) -> ViTOutput:
        """Run the encoder on images (B, H, W, 3) whose sides are multiples of the patch size.

        Args:
          images: (B, H, W, 3) ImageNet-normalised.
          hooks: block indices whose raw outputs to return, in the given order; None returns every block. Blocks after
            max(hooks) are not run, and last_hidden_state is the final LayerNorm of block max(hooks).
        """
        num_layers = self.cfg.num_layers
        hooks = tuple(range(num_layers)) if hooks is None else tuple(int(i) for i in hooks)
        if not hooks or any(not 0 <= i < num_layers for i in hooks):
            raise ValueError(f"hooks must be a non-empty list of block indices in [0, {num_layers}), got {hooks}")
        x, grid = self.embed(images)
        outputs = {}
        for index in range(max(hooks) + 1):
            x = self.blocks[index](x)
            outputs[index] = x
        return ViTOutput(tuple(outputs[i] for i in hooks), self.norm(x), grid)


def patch_tokens(tokens: jax.Array, cfg: ViTConfig, grid: tuple[int, int]) -> jax.Array:
    """Drop class and register tokens and fold (B, T, C) into the patch grid (B, h, w, C)."""
    h, w = grid
    expected = cfg.num_prefix_tokens + h * w
    if tokens.shape[1] != expected:
        raise ValueError(f"token sequence of length {tokens.shape[1]} does not match {cfg.num_prefix_tokens} prefix "
                         f"tokens + grid {h}x{w}")
    return tokens[:, cfg.num_prefix_tokens:].reshape(tokens.shape[0], h, w, tokens.shape[-1])


@functools.partial(nnx.jit, static_argnames=("hooks",))
def _forward_arrays(model: ViT, images: jax.Array, hooks: tuple[int, ...] | None):
    out = model(images, hooks=hooks)
    return out.hidden_states, out.last_hidden_state


def forward(model: ViT, images: jax.Array, hooks: Sequence[int] | None = None) -> ViTOutput:
    """Jitted `model(images, hooks=hooks)`; each new image size or hook tuple compiles once.

    The grid is computed outside jit so that it stays a tuple of Python ints.
    """
    hidden_states, last = _forward_arrays(model, images, None if hooks is None else tuple(hooks))
    p = model.cfg.patch_size
    return ViTOutput(hidden_states, last, (images.shape[1] // p, images.shape[2] // p))
