"""DINOv3 ViT encoders (Siméoni et al. 2025): ViT-S/16, S+/16, B/16, L/16, H+/16, 7B/16, as transformers 5
`DINOv3ViTModel`.

Same interface as `flowfeat_jax.models.vit.ViT` (config with patch_size, hidden_size, num_layers, num_prefix_tokens;
`__call__(images, *, hooks) -> ViTOutput`; `.norm`), so FlowFeat, `vit.patch_tokens` and `vit.forward` take either.
What differs from the DINOv2 ViT:
- no position table: rotary position embeddings (RoPE) on the patch tokens' queries and keys, computed from the patch
  grid itself, so any image whose sides are multiples of 16 works without interpolation;
- separate q/k/v projections, the key without bias (checkpoints store none; the original code masks it to zero);
- always layer scale and 4 register tokens; LayerNorm eps 1e-5; the "plus" and 7B models use a SwiGLU MLP.
RoPE augmentation (coordinate shift / jitter / rescale) is a training-time option of the reference and is off here,
as in the reference at eval. Weights come from `flowfeat_jax.ports.dinov3` (or `ports.registry.from_pretrained`).

Images are NHWC, ImageNet-normalised (recipe "Image normalisation").
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowfeat_jax.models import ops
from flowfeat_jax.models.vit import LayerScale, Mlp, PatchEmbed, SwiGLU, ViTOutput, check_image_size


@dataclasses.dataclass(frozen=True)
class DINOv3Config:
    """One DINOv3 ViT. `mlp_dim` is the MLP hidden width (for SwiGLU, the width of each of the gate/up halves),
    `rope_theta` the RoPE base period."""

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_registers: int = 4
    swiglu: bool = False
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"DINOv3 RoPE needs a head width divisible by 4, got {self.hidden_size // self.num_heads}")

    @property
    def family(self) -> str:
        return "dinov3"

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus register tokens, which precede the patch tokens in every sequence."""
        return 1 + self.num_registers

    @classmethod
    def _lvd1689m(cls, hidden_size, num_layers, num_heads, mlp_dim, **overrides):
        # facebook/dinov3-*-pretrain-lvd1689m: patch 16, 4 registers, eps 1e-5, RoPE base 100.
        base = cls(patch_size=16, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def dinov3_vits16(cls, **overrides) -> "DINOv3Config":
        return cls._lvd1689m(384, 12, 6, 1536, **overrides)

    @classmethod
    def dinov3_vits16plus(cls, **overrides) -> "DINOv3Config":
        return cls._lvd1689m(384, 12, 6, 1536, swiglu=True, **overrides)

    @classmethod
    def dinov3_vitb16(cls, **overrides) -> "DINOv3Config":
        return cls._lvd1689m(768, 12, 12, 3072, **overrides)

    @classmethod
    def dinov3_vitl16(cls, **overrides) -> "DINOv3Config":
        return cls._lvd1689m(1024, 24, 16, 4096, **overrides)

    @classmethod
    def dinov3_vith16plus(cls, **overrides) -> "DINOv3Config":
        return cls._lvd1689m(1280, 32, 20, 5120, swiglu=True, **overrides)

    @classmethod
    def dinov3_vit7b16(cls, **overrides) -> "DINOv3Config":
        return cls._lvd1689m(4096, 40, 32, 8192, swiglu=True, query_bias=False, value_bias=False, **overrides)


# --------------------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def rope_tables(grid: tuple[int, int], head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables (h*w, head_dim) float32 of the patch grid, as transformers DINOv3ViTRopePositionEmbedding
    in eval mode.

    Patch (i, j) of an h x w grid has its centre at y = 2 (i + 1/2) / h - 1, x = 2 (j + 1/2) / w - 1: each axis is
    normalised by its own length to [-1, 1], so the angles depend on the grid's shape, not on the image size in
    pixels. With D = head_dim and the D/4 frequencies f_k = theta^(-4k/D), k = 0 .. D/4 - 1, a token's angles are
    [2 pi y f, 2 pi x f] (D/2 values), repeated twice to D so that rotate_half pairs channel c with c + D/2.
    Computed in float32 in the same order as torch.
    """
    h, w = grid
    inv_freq = 1.0 / np.float32(theta) ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)  # (D/4,)
    ys = np.arange(0.5, h, dtype=np.float32) / np.float32(h)
    xs = np.arange(0.5, w, dtype=np.float32) / np.float32(w)
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(h * w, 2)
    coords = np.float32(2.0) * coords - np.float32(1.0)  # (P, 2) in [-1, 1]
    angles = np.float32(2 * math.pi) * coords[:, :, None] * inv_freq[None, None, :]  # (P, 2, D/4)
    angles = np.tile(angles.reshape(h * w, -1), (1, 2))  # (P, D)
    tables = np.cos(angles), np.sin(angles)
    for table in tables:
        table.setflags(write=False)  # cached: shared by every caller
    return tables


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, num_prefix_tokens: int) -> jax.Array:
    """Rotate the patch tokens of queries or keys x (B, T, N, D): x cos + rotate_half(x) sin, where
    rotate_half([a, b]) = [-b, a] over the two channel halves. Class and register tokens pass unchanged
    (transformers apply_rotary_pos_emb)."""
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    first, second = jnp.split(patches, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    patches = patches * cos[:, None, :] + rotated * sin[:, None, :]  # tables (P, D) broadcast over heads
    return jnp.concatenate([prefix, patches], axis=1)


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


def _layer_norm(cfg: DINOv3Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with RoPE on the patch queries and keys (transformers DINOv3ViTAttention)."""

    def __init__(self, cfg: DINOv3Config, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.num_prefix_tokens = cfg.num_prefix_tokens
        c = cfg.hidden_size

        def linear(use_bias):
            return nnx.Linear(c, c, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

        self.q_proj = linear(cfg.query_bias)
        self.k_proj = linear(cfg.key_bias)
        self.v_proj = linear(cfg.value_bias)
        self.o_proj = linear(cfg.proj_bias)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        heads = (batch, length, self.num_heads, width // self.num_heads)
        q = apply_rope(self.q_proj(x).reshape(heads), cos, sin, self.num_prefix_tokens)
        k = apply_rope(self.k_proj(x).reshape(heads), cos, sin, self.num_prefix_tokens)
        v = self.v_proj(x).reshape(heads)
        out = ops.attention(q, k, v)  # (B, T, N, D)
        return self.o_proj(out.reshape(batch, length, width))


class Block(nnx.Module):
    """Pre-norm block with layer scale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: DINOv3Config, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ls1 = LayerScale(cfg, rngs=rngs)
        self.norm2 = _layer_norm(cfg, rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs) if cfg.swiglu else Mlp(cfg, rngs=rngs)
        self.ls2 = LayerScale(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x), cos, sin))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv3(nnx.Module):
    """DINOv3 ViT: patch embedding + [class, registers, patches] tokens + RoPE blocks + final LayerNorm `norm`."""

    def __init__(self, cfg: DINOv3Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c = cfg.hidden_size
        init = nnx.initializers.truncated_normal(0.02)
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, c), cfg.param_dtype))
        # Always present, (1, 0, C) without registers, as in transformers (its checkpoints store the empty tensor).
        self.register_tokens = nnx.Param(init(rngs.params(), (1, cfg.num_registers, c), cfg.param_dtype))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = _layer_norm(cfg, rngs)

    def embed(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        """Token sequence (B, 1 + R + h*w, C) before the first block, and the grid (h, w); no position embedding."""
        cfg = self.cfg
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"DINOv3 expects images (B, H, W, 3) NHWC, got shape {images.shape}")
        check_image_size(images.shape[1], images.shape[2], cfg.patch_size)
        patches = self.patch_embed(images.astype(cfg.dtype))
        batch, h, w, c = patches.shape
        cls = jnp.broadcast_to(self.cls_token[...].astype(cfg.dtype), (batch, 1, c))
        registers = jnp.broadcast_to(self.register_tokens[...].astype(cfg.dtype), (batch, cfg.num_registers, c))
        return jnp.concatenate([cls, registers, patches.reshape(batch, h * w, c)], axis=1), (h, w)

    def __call__(self, images: jax.Array, *, hooks: Sequence[int] | None = None) -> ViTOutput:
        """Run the encoder on images (B, H, W, 3) whose sides are multiples of the patch size.

        Args:
          images: (B, H, W, 3) ImageNet-normalised.
          hooks: block indices whose raw outputs to return, in the given order; None returns every block. Blocks after
            max(hooks) are not run, and last_hidden_state is the final LayerNorm of block max(hooks).
        """
        cfg = self.cfg
        hooks = tuple(range(cfg.num_layers)) if hooks is None else tuple(int(i) for i in hooks)
        if not hooks or any(not 0 <= i < cfg.num_layers for i in hooks):
            raise ValueError(f"hooks must be a non-empty list of block indices in [0, {cfg.num_layers}), got {hooks}")
        x, grid = self.embed(images)
        cos, sin = (jnp.asarray(t, cfg.dtype) for t in rope_tables(grid, cfg.hidden_size // cfg.num_heads,
                                                                    cfg.rope_theta))
        outputs = {}
        for index in range(max(hooks) + 1):
            x = self.blocks[index](x, cos, sin)
            outputs[index] = x
        return ViTOutput(tuple(outputs[i] for i in hooks), self.norm(x), grid)
