"""Encoder families FlowFeat can use, and where each one's config, module and Hugging Face port live.

A family is a frozen config dataclass with presets (classmethods named after checkpoints), an NNX module with the
ViT interface (`__call__(images, *, hooks) -> vit.ViTOutput`, `.norm`, `.cfg` with patch_size, hidden_size,
num_layers, num_prefix_tokens, family, dtype, param_dtype), and a port in `flowfeat_jax/ports/` that turns an HF
config.json into the config and fills the module from the checkpoint through an explicit key table. Port functions
are named as "module:function" strings and imported on first use, so that models/ never imports ports/ (which
import models/) at import time.

Used by `ports.vit.from_pretrained` (HF `model_type` -> family), `models.flowfeat.FlowFeat` (config type -> module)
and `train.loop.encoder_config` (preset name -> config). To add a family, see README "Add a backbone".
"""

import dataclasses
import importlib
from collections.abc import Callable

from flax import nnx

from flowfeat_jax.models.dinov3 import DINOv3, DINOv3Config
from flowfeat_jax.models.vit import ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class EncoderFamily:
    """One encoder family.

    Attributes:
      name: short name, e.g. 'vit'.
      config_class: frozen config dataclass; its public classmethods returning a config are the presets.
      module_class: NNX module built as `module_class(cfg, *, rngs)`.
      hf_model_types: `model_type` values of HF config.json files this family loads.
      config_from_hf: "module:function", function(hf_config: dict) -> config.
      hf_key_table: "module:function", function(config) -> list of ports.vit.KeyRow.
      load_hf_state_dict: "module:function", function(module, state: dict of numpy arrays) -> None, strict.
    """

    name: str
    config_class: type
    module_class: type
    hf_model_types: tuple[str, ...]
    config_from_hf: str
    hf_key_table: str
    load_hf_state_dict: str

    def port(self, field: str) -> Callable:
        """The port function named by `field` ('config_from_hf', 'hf_key_table' or 'load_hf_state_dict')."""
        module_name, function_name = getattr(self, field).split(":")
        return getattr(importlib.import_module(module_name), function_name)

    def presets(self) -> tuple[str, ...]:
        """Names of the config presets (public classmethods of the config class)."""
        return tuple(name for name, attr in vars(self.config_class).items()
                     if isinstance(attr, classmethod) and not name.startswith("_"))


FAMILIES: tuple[EncoderFamily, ...] = (
    EncoderFamily(
        name="vit",
        config_class=ViTConfig,
        module_class=ViT,
        hf_model_types=("dinov2", "dinov2_with_registers", "vit", "vit_mae"),
        config_from_hf="flowfeat_jax.ports.vit:vit_config_from_hf",
        hf_key_table="flowfeat_jax.ports.vit:hf_key_table",
        load_hf_state_dict="flowfeat_jax.ports.vit:load_hf_state_dict",
    ),
    EncoderFamily(
        name="dinov3",
        config_class=DINOv3Config,
        module_class=DINOv3,
        hf_model_types=("dinov3_vit",),
        config_from_hf="flowfeat_jax.ports.dinov3:dinov3_config_from_hf",
        hf_key_table="flowfeat_jax.ports.dinov3:hf_key_table",
        load_hf_state_dict="flowfeat_jax.ports.dinov3:load_hf_state_dict",
    ),
)


def hf_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.hf_model_types)


def family_for_model_type(model_type: str | None) -> EncoderFamily:
    """The family that loads HF checkpoints of this `model_type`; ValueError naming the supported ones otherwise."""
    for family in FAMILIES:
        if model_type in family.hf_model_types:
            return family
    raise ValueError(f"unsupported HF model_type {model_type!r}; expected one of {hf_model_types()}")


def family_for_config(cfg) -> EncoderFamily:
    """The family whose config class `cfg` is an instance of."""
    for family in FAMILIES:
        if isinstance(cfg, family.config_class):
            return family
    raise ValueError(f"no encoder family for config type {type(cfg).__name__}; known: "
                     f"{[f.config_class.__name__ for f in FAMILIES]}")


def build_encoder(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
    """The encoder module of a config (a ViT for a ViTConfig, a DINOv3 for a DINOv3Config, ...)."""
    return family_for_config(cfg).module_class(cfg, rngs=rngs)


def preset_config(name: str, **overrides):
    """The config of a preset by name (e.g. 'dinov2_vits14', 'dinov3_vitb16'), with dataclass fields replaced."""
    for family in FAMILIES:
        if name in family.presets():
            return dataclasses.replace(getattr(family.config_class, name)(), **overrides)
    known = sorted(p for family in FAMILIES for p in family.presets())
    raise ValueError(f"unknown encoder preset {name!r}; known: {known}")
