"""The encoder-family registry: HF model_type and preset dispatch, module building, and, for every preset of every
family, a port table that covers the module's parameters one to one (template for a new family: README "Add a
backbone")."""

import dataclasses

import flax.nnx as nnx
import ml_collections
import pytest

from flowfeat_jax.config import base_config
from flowfeat_jax.models.dinov3 import DINOv3, DINOv3Config
from flowfeat_jax.models.flowfeat import build_encoder
from flowfeat_jax.models.vit import ViT, ViTConfig
from flowfeat_jax.ports import build, registry

PRESETS = [(family, name) for family in registry.FAMILIES for name in family.presets()]


def test_families_are_disjoint_and_complete():
    types = registry.hf_model_types()
    assert len(types) == len(set(types))
    assert {"dinov2", "dinov2_with_registers", "vit", "vit_mae", "dinov3_vit"} <= set(types)
    names = [name for _, name in PRESETS]
    assert len(names) == len(set(names))
    assert {"dinov2_vits14", "dino_vitb16", "mae_vitl16", "dinov3_vits16", "dinov3_vit7b16"} <= set(names)
    for family in registry.FAMILIES:
        for field in ("config_from_hf", "hf_key_table", "load_hf_state_dict"):
            assert callable(getattr(family, field)), (family.name, field)


def test_dispatch_by_model_type_and_config():
    assert registry.family_for_model_type("dinov3_vit").module_class is DINOv3
    assert registry.family_for_model_type("vit_mae").module_class is ViT
    with pytest.raises(ValueError, match="model_type 'clip'.*dinov3_vit"):
        registry.family_for_model_type("clip")
    assert registry.family_for_config(DINOv3Config.dinov3_vitb16()).name == "dinov3"
    with pytest.raises(ValueError, match="no encoder family for config type"):
        registry.family_for_config(ml_collections.ConfigDict())


@pytest.mark.parametrize("family, name", PRESETS, ids=[name for _, name in PRESETS])
def test_every_preset_builds_and_its_table_covers_the_module(family, name):
    """Each preset at a small width and depth: the module builds from the config alone, and the port table maps every
    parameter exactly once with no stray rows (options such as SwiGLU, registers or missing biases change both)."""
    cfg = registry.preset_config(name, hidden_size=64, num_heads=2, mlp_dim=64, num_layers=2)
    assert isinstance(cfg, family.config_class)
    module = nnx.eval_shape(lambda: build_encoder(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(module, family.module_class) and module.cfg == cfg
    params = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    rows = family.hf_key_table(cfg)
    assert sorted(row.nnx_path for row in rows) == sorted(params)
    for field in ("disk_names", "memory_names"):
        names = [n for row in rows for n in getattr(row, field)]
        assert len(names) == len(set(names)), field


def test_preset_config_and_build_encoder_config():
    assert registry.preset_config("dinov2_vits14") == ViTConfig.dinov2_vits14()
    assert registry.preset_config("dinov3_vitl16", num_layers=4) == dataclasses.replace(
        DINOv3Config.dinov3_vitl16(), num_layers=4)
    with pytest.raises(ValueError, match="unknown encoder preset 'dinov3_vitx16'.*dinov3_vits16"):
        registry.preset_config("dinov3_vitx16")
    with pytest.raises(ValueError, match="unknown encoder preset 'dtype'"):  # a config field is not a preset
        registry.preset_config("dtype")
    model_cfg = base_config().model
    model_cfg.encoder_arch = "dinov3_vits16plus"
    model_cfg.encoder_size.num_layers = 4
    model_cfg.dtype = "bfloat16"
    cfg = build.encoder_config(model_cfg)
    assert isinstance(cfg, DINOv3Config) and cfg.swiglu and cfg.num_layers == 4 and cfg.dtype == "bfloat16"
    model_cfg.encoder_arch = "resnet50"
    with pytest.raises(ValueError, match="model.encoder_arch: unknown encoder preset 'resnet50'"):
        build.encoder_config(model_cfg)
