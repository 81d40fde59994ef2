"""DINO / DINOv2 / MAE ViT encoders in plain torch, with the torch-hub parameter names (NCHW in, tokens out).

A clean-room twin of the encoders the reference FlowFeat loads (facebookresearch/dino vision_transformer.py,
facebookresearch/dinov2 dinov2/models/vision_transformer.py with block_chunks=0, the reference MAEEncoder with timm
Blocks), so that exported weights run without those repositories. State-dict keys: patch_embed.proj.*, cls_token,
pos_embed, register_tokens (DINOv2 registers), mask_token (every DINOv2), blocks.N.{norm1, attn.qkv, attn.proj,
ls1.gamma, norm2, mlp.fc1, mlp.fc2 | mlp.w12, mlp.w3, ls2.gamma}.*, norm.*.

Position tables are resized as the torch hub does (`pos_interp='hub'` of flowfeat_jax.models.vit): bicubic with scale
factor (n + 0.1) / M, or, for register models, antialiased bicubic to size n. The reference MAE never resizes at run
time (its table is resampled once to the training grid); here it is resized like DINO for other input sizes.
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# torch-hub DINO/DINOv2 without registers add this to the target grid and interpolate with a scale factor.
HUB_INTERPOLATE_OFFSET = 0.1


@dataclasses.dataclass(frozen=True)
class HubViTConfig:
    """One hub ViT. `mlp_dim` is the MLP hidden width (for SwiGLU, each of the gate/up halves); `pos_grid` the side
    of the stored square position table; `mask_token` marks DINOv2 (whose hub model always carries one)."""

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_registers: int = 0
    layer_scale: bool = False
    swiglu: bool = False
    qkv_bias: bool = True
    mask_token: bool = False
    pos_grid: int = 14
    pos_antialias: bool = False
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_registers


def mae_sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """The fixed MAE position table (1, 1 + grid², dim) float32: zero class row, then 2-D sin-cos of the patch grid
    (first half of the channels from the column index, second half from the row index; reference util/pos_embed.py)."""
    if dim % 4:
        raise ValueError(f"MAE sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")

    def encode(positions):
        angles = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0)[None].astype(np.float32)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: HubViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, C)


class Attention(nn.Module):
    def __init__(self, cfg: HubViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class LayerScale(nn.Module):
    def __init__(self, cfg: HubViTConfig):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, cfg: HubViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class SwiGLUFused(nn.Module):
    """DINOv2 giant's SwiGLUFFNFused: w3(silu(gate) * up), [gate | up] = w12(x)."""

    def __init__(self, cfg: HubViTConfig):
        super().__init__()
        self.w12 = nn.Linear(cfg.hidden_size, 2 * cfg.mlp_dim)
        self.w3 = nn.Linear(cfg.mlp_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: HubViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SwiGLUFused(cfg) if cfg.swiglu else Mlp(cfg)
        self.ls2 = LayerScale(cfg) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class HubViT(nn.Module):
    """[class, registers, patches] tokens through the blocks; returns the raw outputs of the hooked blocks."""

    def __init__(self, cfg: HubViTConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, c))
        if cfg.num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, c))
        if cfg.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, c))  # unused at inference; kept for the hub key set
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)

    def patch_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The patch rows of the position table resized to `grid` (h, w) as the hub does: (1, h*w, C)."""
        side, c = self.cfg.pos_grid, self.cfg.hidden_size
        table = self.pos_embed[:, 1:]
        if tuple(grid) == (side, side):
            return table
        table = table.float().reshape(1, side, side, c).permute(0, 3, 1, 2)
        if self.cfg.pos_antialias:
            table = F.interpolate(table, size=grid, mode="bicubic", antialias=True)
        else:
            scale = tuple((n + HUB_INTERPOLATE_OFFSET) / side for n in grid)
            table = F.interpolate(table, scale_factor=scale, mode="bicubic")
        if tuple(table.shape[-2:]) != tuple(grid):
            raise ValueError(f"position table resized to {tuple(table.shape[-2:])}, expected grid {grid}")
        return table.permute(0, 2, 3, 1).reshape(1, -1, c)

    def forward(self, x: torch.Tensor, hooks: Sequence[int]) -> list[torch.Tensor]:
        """Raw outputs (B, T, C) of the blocks in `hooks` for images x (B, 3, H, W); later blocks are not run."""
        p = self.cfg.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"expected images (B, 3, H, W) with H, W multiples of {p}, got {tuple(x.shape)}")
        grid = (x.shape[2] // p, x.shape[3] // p)
        patches = self.patch_embed(x) + self.patch_pos_embed(grid)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        parts = [cls]
        if self.cfg.num_registers:
            parts.append(self.register_tokens.expand(x.shape[0], -1, -1))
        tokens = torch.cat([*parts, patches], dim=1)
        outputs = {}
        for index in range(max(hooks) + 1):
            tokens = self.blocks[index](tokens)
            outputs[index] = tokens
        return [outputs[i] for i in hooks]


# Heads of the released FlowFeat backbones by width: ViT-S (DINO, DINOv2), ViT-B (DINO, DINOv2, MAE), ViT-L.
RELEASED_HEADS = {384: 6, 768: 12, 1024: 16}


def head_count(hidden_size: int) -> int:
    """Heads of a released hub ViT of this width. Any other width is ambiguous (width 128 may have 2 or 4 heads, and
    guessing runs another model silently): refused, asking for the head count."""
    if hidden_size not in RELEASED_HEADS:
        raise ValueError(f"cannot infer the number of heads of a ViT of width {hidden_size} (released widths: "
                         f"{', '.join(map(str, RELEASED_HEADS))}); give the head count (--num-heads / num_heads)")
    return RELEASED_HEADS[hidden_size]


def square_side(num_positions: int) -> int:
    """Side M of a square position table with M² rows; ValueError otherwise."""
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"position table with {num_positions} patch rows is not a square grid")
    return side
