"""FlowFeat H = D ∘ E: a frozen ViT encoder E and a trainable DPT decoder D (recipe.md "Model").

Mirrors model.py FlowFeat.forward_up: the decoder reads the raw outputs of four encoder blocks (`hooks`), and the
model also returns the encoder's final LayerNorm applied to the last hooked block. The reference drops only the class
token (SkipCLS); here class and register tokens are dropped, which is the same for register-free encoders.
"""

import dataclasses
from typing import NamedTuple

import jax
from flax import nnx

from flowfeat_jax.models.dinov3 import DINOv3, DINOv3Config
from flowfeat_jax.models.dpt import DPT, DPTConfig, check_token_grid
from flowfeat_jax.models.vit import ViT, ViTConfig, patch_tokens

# The encoder module of each encoder config type; `ports.registry.FAMILIES` adds each family's Hugging Face port.
ENCODER_MODULES: dict[type, type] = {ViTConfig: ViT, DINOv3Config: DINOv3}


def build_encoder(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
    """The encoder module of a config (a ViT for a ViTConfig, a DINOv3 for a DINOv3Config, ...)."""
    if type(cfg) not in ENCODER_MODULES:
        raise ValueError(f"no encoder family for config type {type(cfg).__name__}; known: "
                         f"{[c.__name__ for c in ENCODER_MODULES]}")
    return ENCODER_MODULES[type(cfg)](cfg, rngs=rngs)


def default_hooks(num_layers: int) -> tuple[int, int, int, int]:
    """Last block of every quarter of the encoder: (2, 5, 8, 11) for 12 blocks, (5, 11, 17, 23) for 24 (reference
    CfgDPT hooks for ViT-S/B and ViT-L)."""
    if num_layers < 4:
        raise ValueError(f"an encoder needs at least 4 blocks for 4 DPT hooks, got {num_layers}")
    return tuple(quarter * num_layers // 4 - 1 for quarter in (1, 2, 3, 4))


@dataclasses.dataclass(frozen=True)
class FlowFeatConfig:
    """Encoder and decoder configs plus the four encoder blocks the decoder reads, in increasing order. The encoder
    config is a ViTConfig or any config of `ENCODER_MODULES` (e.g. DINOv3Config)."""

    encoder: ViTConfig
    decoder: DPTConfig
    hooks: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "hooks", tuple(int(i) for i in self.hooks))
        n = self.encoder.num_layers
        increasing = list(self.hooks) == sorted(set(self.hooks))
        if len(self.hooks) != 4 or not increasing or self.hooks[0] < 0 or self.hooks[-1] >= n:
            raise ValueError(f"hooks must be 4 increasing block indices in [0, {n}), got {self.hooks}")
        if self.decoder.vit_dim != self.encoder.hidden_size or self.decoder.patch_size != self.encoder.patch_size:
            raise ValueError(
                f"decoder (vit_dim {self.decoder.vit_dim}, patch {self.decoder.patch_size}) does not fit the encoder "
                f"(hidden_size {self.encoder.hidden_size}, patch {self.encoder.patch_size})"
            )

    @classmethod
    def from_encoder(cls, vit_cfg: ViTConfig, features: int = 128, hooks=None) -> "FlowFeatConfig":
        """FlowFeat for an encoder: reference DPT widths, `features` channels out, default hooks unless given."""
        return cls(
            encoder=vit_cfg,
            decoder=DPTConfig.for_encoder(vit_cfg, features),
            hooks=default_hooks(vit_cfg.num_layers) if hooks is None else tuple(hooks),
        )


class EncoderFeatures(NamedTuple):
    hooked: tuple  # 4 × (B, h, w, C) raw outputs of the hooked blocks, patch tokens only
    final: jax.Array  # (B, h, w, C) encoder LayerNorm of hooked[-1]


class FlowFeat(nnx.Module):
    """H = D ∘ E. Only `decoder` is trained; encoder outputs carry no gradient (recipe.md "Model")."""

    def __init__(self, cfg: FlowFeatConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder, rngs=rngs)  # ViT, DINOv3, ... by config type
        self.decoder = DPT(cfg.decoder, rngs=rngs)

    def encode(self, images: jax.Array) -> EncoderFeatures:
        """Frozen encoder features of images (B, H, W, 3), H and W multiples of 2p (model.py forward_up)."""
        check_token_grid(images.shape[1], images.shape[2], self.cfg.encoder.patch_size)
        out = self.encoder(images, hooks=self.cfg.hooks)
        hooked = tuple(patch_tokens(tokens, self.cfg.encoder, out.grid) for tokens in out.hidden_states)
        final = self.encoder.norm(hooked[-1])  # per-token norm, so norm-then-drop equals drop-then-norm
        return jax.lax.stop_gradient(EncoderFeatures(hooked, final))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(encoder features (B, h, w, C), FlowFeat features (B, H, W, d)) of images (B, H, W, 3)."""
        features = self.encode(images)
        return features.final, self.decoder(features.hooked, images.shape[1:3])


@nnx.jit
def forward(model: FlowFeat, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Jitted `model(images)`; each new image size compiles once."""
    return model(images)
