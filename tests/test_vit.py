"""Parity of flowfeat_jax ViT encoders with transformers 5 (Dinov2, Dinov2WithRegisters, ViT, ViTMAE) and of the
bicubic position-table kernel with torch F.interpolate."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
import transformers
from conftest import random_images, save_hf_models

from flowfeat_jax.models.vit import ViTConfig, bicubic_resize_matrix, forward, patch_tokens, resize_pos_table
from flowfeat_jax.ports.registry import from_pretrained
from flowfeat_jax.ports.vit import hf_key_table, vit_config_from_hf

TOL = 1e-4
SIZES = [(224, 224), (112, 336)]  # stored grid at 224; the second needs interpolation (and downsampling)


def _tiny_hf(kind: str):
    """A tiny HF model (2 blocks, width 32) with every parameter perturbed, so that a swapped bias or scale shows."""
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=224)
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(patch_size=14, mlp_ratio=2, **common))
    elif kind == "dinov2_swiglu":
        model = transformers.Dinov2Model(transformers.Dinov2Config(patch_size=14, use_swiglu_ffn=True, **common))
    elif kind == "dinov2_registers":
        config = transformers.Dinov2WithRegistersConfig(patch_size=14, mlp_ratio=2, num_register_tokens=3, **common)
        model = transformers.Dinov2WithRegistersModel(config)
    elif kind == "dino":
        model = transformers.ViTModel(transformers.ViTConfig(patch_size=16, intermediate_size=64, **common))
    elif kind == "mae":
        config = transformers.ViTMAEConfig(patch_size=16, intermediate_size=64, mask_ratio=0.0, **common)
        model = transformers.ViTMAEModel(config)
    else:
        raise ValueError(kind)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


KINDS = ["dinov2", "dinov2_swiglu", "dinov2_registers", "dino", "mae"]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return save_hf_models(_tiny_hf, KINDS, tmp_path_factory)


def _torch_hidden_states(model, images):
    """(per-block outputs, final norm) of the HF model for NHWC numpy images."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    kwargs = {"output_hidden_states": True}
    if isinstance(model, transformers.ViTMAEModel):
        # mask_ratio 0 and increasing noise keep every token in its order (no masking, no shuffle).
        num_patches = (images.shape[1] // 16) * (images.shape[2] // 16)
        kwargs["noise"] = torch.arange(num_patches, dtype=torch.float32).expand(images.shape[0], -1)
    if isinstance(model, (transformers.ViTModel, transformers.ViTMAEModel)):
        kwargs["interpolate_pos_encoding"] = True
    with torch.inference_mode():
        out = model(pixels, **kwargs)
    return [h.numpy() for h in out.hidden_states[1:]], out.last_hidden_state.numpy()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_parity_every_block(hf_models, kind, size):
    torch_model, directory = hf_models[kind]
    model = from_pretrained(directory)
    images = random_images(*size)
    expected_blocks, expected_final = _torch_hidden_states(torch_model, images)
    out = forward(model, jnp.asarray(images))
    assert len(out.hidden_states) == len(expected_blocks) == 2
    for index, (ours, theirs) in enumerate(zip(out.hidden_states, expected_blocks)):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0, err_msg=f"block {index}")
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), expected_final, atol=TOL, rtol=0)
    patch = model.cfg.patch_size
    assert out.grid == (size[0] // patch, size[1] // patch)


def test_hooks_order_and_early_stop(hf_models):
    torch_model, directory = hf_models["dinov2_registers"]
    model = from_pretrained(directory)
    images = random_images(112, 168, batch=1)
    expected_blocks, _ = _torch_hidden_states(torch_model, images)
    out = forward(model, jnp.asarray(images), hooks=(1, 0))
    np.testing.assert_allclose(np.asarray(out.hidden_states[0]), expected_blocks[1], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.hidden_states[1]), expected_blocks[0], atol=TOL, rtol=0)
    assert isinstance(out.grid[0], int) and out.grid == (8, 12)
    early = forward(model, jnp.asarray(images), hooks=[0])
    with torch.inference_mode():
        expected_norm = torch_model.layernorm(torch.from_numpy(expected_blocks[0])).numpy()
    np.testing.assert_allclose(np.asarray(early.last_hidden_state), expected_norm, atol=TOL, rtol=0)
    tokens = patch_tokens(early.last_hidden_state, model.cfg, early.grid)
    assert tokens.shape == (1, 8, 12, 32)
    np.testing.assert_allclose(np.asarray(tokens[0, 0, 1]), expected_norm[0, 1 + 3 + 1], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="hooks"):
        model(jnp.asarray(images), hooks=[2])


def test_in_memory_names_and_wrapper_prefix_load(hf_models, tmp_path):
    """transformers-5 module names (attention.q_proj, mlp.gate_proj, layers.N) and a `dinov2.` prefix load too."""
    for kind in ("dinov2_swiglu", "mae"):
        torch_model, directory = hf_models[kind]
        state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
        prefix = "dinov2." if kind.startswith("dinov2") else "vit."
        state = {prefix + k: v for k, v in state.items()} | {"classifier.weight": np.zeros((3, 64), np.float32)}
        target = tmp_path / kind
        target.mkdir()
        safetensors.numpy.save_file(state, target / "model.safetensors")
        (target / "config.json").write_text((directory / "config.json").read_text())
        images = random_images(112, 112, batch=1)
        ours = forward(from_pretrained(target), jnp.asarray(images)).last_hidden_state
        reference = forward(from_pretrained(directory), jnp.asarray(images)).last_hidden_state
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def _rewrite_checkpoint(source, target, edit):
    state = safetensors.numpy.load_file(source / "model.safetensors")
    edit(state)
    target.mkdir()
    safetensors.numpy.save_file(state, target / "model.safetensors")
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


def test_bad_checkpoints_fail_naming_every_key(hf_models, tmp_path):
    _, directory = hf_models["dinov2"]
    key = "encoder.layer.1.attention.attention.value.bias"

    def break_keys(state):
        del state[key]
        state["encoder.layer.0.surprise.weight"] = np.zeros(3, np.float32)
        state["layernorm.weight"] = np.zeros(31, np.float32)

    broken = _rewrite_checkpoint(directory, tmp_path / "broken", break_keys)
    with pytest.raises(ValueError) as error:
        from_pretrained(broken)
    message = str(error.value)
    assert key in message and "encoder.layer.0.surprise.weight" in message and "layernorm.weight" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(empty)


def test_table_is_one_to_one(hf_models):
    """Every NNX parameter has exactly one row, and no torch name is used twice."""
    for kind in KINDS:
        _, directory = hf_models[kind]
        cfg = vit_config_from_hf(json.loads((directory / "config.json").read_text()))
        rows = hf_key_table(cfg)
        paths = [r.nnx_path for r in rows]
        assert len(paths) == len(set(paths))
        for field in ("disk_names", "memory_names"):
            names = [n for r in rows for n in getattr(r, field)]
            assert len(names) == len(set(names)), (kind, field)


def test_config_from_hf_rejects_unsupported():
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).to_dict()
    assert vit_config_from_hf(config).mlp_dim == 128
    with pytest.raises(ValueError, match="gelu_new"):
        vit_config_from_hf(config | {"hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="model_type"):
        vit_config_from_hf(config | {"model_type": "clip"})
    giant = transformers.Dinov2Config(hidden_size=1536, use_swiglu_ffn=True).to_dict()
    assert vit_config_from_hf(giant).mlp_dim == ViTConfig.dinov2_vitg14().mlp_dim == 4096


def test_bad_image_size_names_nearest_valid(hf_models):
    model = from_pretrained(hf_models["dinov2"][1])
    with pytest.raises(ValueError, match="100x150.*98x154"):
        model(jnp.zeros((1, 100, 150, 3)))


def test_bf16_compute_close_to_f32(hf_models):
    directory = hf_models["dino"][1]
    images = jnp.asarray(random_images(112, 112, batch=1))
    full = forward(from_pretrained(directory), images).last_hidden_state
    half = forward(from_pretrained(directory, dtype=jnp.bfloat16), images).last_hidden_state
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(full), atol=0.1, rtol=0)


# ---- the bicubic kernel itself ----------------------------------------------------------------------------------


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("use_scale_factor", [False, True], ids=["size", "scale_factor"])
@pytest.mark.parametrize("side", [4, 16, 37])
def test_bicubic_matrix_matches_torch(side, use_scale_factor, antialias):
    table = np.random.default_rng(side).standard_normal((1, 3, side, side)).astype(np.float32)
    for height, width in [(2, 3), (5, 9), (side, side + 7), (side - 1, side), (40, 61)]:
        if use_scale_factor:  # hub style: (n + 0.1) / M, the output size is floor(M * factor) = n
            factors = ((height + 0.1) / side, (width + 0.1) / side)
            expected = F.interpolate(torch.from_numpy(table), scale_factor=factors, mode="bicubic",
                                     align_corners=False, antialias=antialias)
        else:
            factors = (None, None)
            expected = F.interpolate(torch.from_numpy(table), size=(height, width), mode="bicubic",
                                     align_corners=False, antialias=antialias)
        rows = bicubic_resize_matrix(side, height, scale_factor=factors[0], antialias=antialias)
        cols = bicubic_resize_matrix(side, width, scale_factor=factors[1], antialias=antialias)
        ours = np.einsum("hm,cmn,wn->chw", rows, table[0], cols)
        np.testing.assert_allclose(ours, expected[0].numpy(), atol=TOL, rtol=0, err_msg=f"{height}x{width}")


@pytest.mark.parametrize("mode,antialias", [("hf", False), ("hf", True), ("hub", False), ("hub", True)])
def test_resize_pos_table_modes(mode, antialias):
    """'hub' without antialias = torch-hub DINO/DINOv2 ((n + 0.1)/M factor); with it = hub registers (size)."""
    side, grid = 37, (16, 30)
    table = np.random.default_rng(1).standard_normal((side, side, 8)).astype(np.float32)
    nchw = torch.from_numpy(table).permute(2, 0, 1)[None]
    if mode == "hub" and not antialias:
        kwargs = {"scale_factor": tuple((n + 0.1) / side for n in grid)}
    else:
        kwargs = {"size": grid}
    expected = F.interpolate(nchw, mode="bicubic", align_corners=False, antialias=antialias, **kwargs)
    ours = resize_pos_table(jnp.asarray(table), grid, mode=mode, antialias=antialias)
    np.testing.assert_allclose(np.asarray(ours), expected[0].permute(1, 2, 0).numpy(), atol=TOL, rtol=0)
    same = resize_pos_table(jnp.asarray(table), (side, side), mode=mode, antialias=antialias)
    np.testing.assert_array_equal(np.asarray(same), table)  # both torch worlds skip the resize at the stored grid
