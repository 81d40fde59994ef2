"""DINOv3 ViT: parity with transformers 5 DINOv3ViTModel block by block, the strict port, FlowFeat and the train
step with a DINOv3 encoder, tools/extract_features.py on a DINOv3 checkpoint, and the DINOv3 configs."""

import dataclasses
import importlib.util
import json
import pathlib

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import random_images, save_hf_models
from PIL import Image

from flowfeat_jax.config import base_config
from flowfeat_jax.data import synthetic
from flowfeat_jax.models import flowfeat as flowfeat_lib
from flowfeat_jax.models.dinov3 import DINOv3, DINOv3Config, rope_tables
from flowfeat_jax.models.vit import forward, normalize_images, patch_tokens
from flowfeat_jax.ports import build
from flowfeat_jax.ports.dinov3 import dinov3_config_from_hf, hf_key_table, load_hf_state_dict
from flowfeat_jax.ports.registry import from_pretrained
from flowfeat_jax.train import loop
from flowfeat_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4
SIZES = [(224, 224), (112, 320)]  # a square grid and a non-square 7x20 one (RoPE normalises each axis by its length)

# Tiny configs that together switch every option on and off: MLP kind, register count, each projection bias.
KINDS = {
    "plain": dict(num_register_tokens=3, intermediate_size=48),
    "swiglu": dict(num_register_tokens=2, intermediate_size=40, use_gated_mlp=True, hidden_act="silu",
                   query_bias=False, key_bias=True, value_bias=False),
    "no_registers": dict(num_register_tokens=0, intermediate_size=48, proj_bias=False, layer_norm_eps=1e-6,
                         rope_theta=50.0),
}


def _tiny_hf(kind: str, num_layers: int = 2) -> transformers.DINOv3ViTModel:
    """A tiny DINOv3ViTModel (width 32, 2 heads of 16) with every parameter perturbed, so that a swapped bias or
    scale shows."""
    config = transformers.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                                          **KINDS[kind])
    model = transformers.DINOv3ViTModel(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return save_hf_models(_tiny_hf, KINDS, tmp_path_factory)


def _torch_outputs(model, images):
    """(embeddings, per-block outputs, final norm) of the HF model for NHWC numpy images."""
    with torch.inference_mode():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]
    return hidden[0], hidden[1:], out.last_hidden_state.numpy()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_every_stage(hf_models, kind, size):
    torch_model, directory = hf_models[kind]
    model = from_pretrained(directory)
    assert isinstance(model, DINOv3)
    images = random_images(*size)
    expected_embed, expected_blocks, expected_final = _torch_outputs(torch_model, images)
    tokens, grid = model.embed(jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(tokens), expected_embed, atol=TOL, rtol=0, err_msg="embeddings")
    out = forward(model, jnp.asarray(images))
    assert len(out.hidden_states) == len(expected_blocks) == 2
    for index, (ours, theirs) in enumerate(zip(out.hidden_states, expected_blocks)):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0, err_msg=f"block {index}")
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), expected_final, atol=TOL, rtol=0)
    assert out.grid == grid == (size[0] // 16, size[1] // 16)


@pytest.mark.parametrize("grid", [(14, 14), (7, 20), (3, 1)])
def test_rope_tables_match_transformers(grid):
    config = transformers.DINOv3ViTConfig(hidden_size=64, num_attention_heads=2, rope_theta=100.0)
    rope = transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTRopePositionEmbedding(config).eval()
    with torch.inference_mode():
        cos, sin = rope(torch.zeros(1, 3, grid[0] * 16, grid[1] * 16))
    ours_cos, ours_sin = rope_tables(grid, 32, 100.0)
    assert ours_cos.shape == (grid[0] * grid[1], 32)
    np.testing.assert_allclose(ours_cos, cos.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours_sin, sin.numpy(), atol=1e-6, rtol=0)


def test_hooks_order_early_stop_and_patch_tokens(hf_models):
    torch_model, directory = hf_models["plain"]
    model = from_pretrained(directory)
    images = random_images(64, 96, batch=1)
    _, expected_blocks, _ = _torch_outputs(torch_model, images)
    out = forward(model, jnp.asarray(images), hooks=(1, 0))
    np.testing.assert_allclose(np.asarray(out.hidden_states[0]), expected_blocks[1], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.hidden_states[1]), expected_blocks[0], atol=TOL, rtol=0)
    early = forward(model, jnp.asarray(images), hooks=[0])
    with torch.inference_mode():
        expected_norm = torch_model.norm(torch.from_numpy(expected_blocks[0])).numpy()
    np.testing.assert_allclose(np.asarray(early.last_hidden_state), expected_norm, atol=TOL, rtol=0)
    tokens = patch_tokens(early.last_hidden_state, model.cfg, early.grid)
    assert model.cfg.num_prefix_tokens == 4 and tokens.shape == (1, 4, 6, 32)
    np.testing.assert_allclose(np.asarray(tokens[0, 0, 1]), expected_norm[0, 4 + 1], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="hooks"):
        model(jnp.asarray(images), hooks=[2])
    with pytest.raises(ValueError, match="100x150.*96x144"):
        model(jnp.zeros((1, 100, 150, 3)))


def test_in_memory_names_load(hf_models, tmp_path):
    """A transformers-5 module state_dict (`model.layer.N.*`) loads to the same encoder as the on-disk names."""
    torch_model, directory = hf_models["swiglu"]
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert any(k.startswith("model.layer.0.") for k in state)
    safetensors.numpy.save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    images = jnp.asarray(random_images(64, 64, batch=1))
    ours = forward(from_pretrained(tmp_path), images).last_hidden_state
    reference = forward(from_pretrained(directory), images).last_hidden_state
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_bad_checkpoint_names_every_key(hf_models, tmp_path):
    _, directory = hf_models["plain"]
    state = safetensors.numpy.load_file(directory / "model.safetensors")
    missing = "layer.1.attention.v_proj.bias"
    del state[missing]
    state["layer.0.attention.k_proj.bias"] = np.zeros(32, np.float32)  # the config says key_bias=False
    state["norm.weight"] = np.zeros(31, np.float32)
    safetensors.numpy.save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ValueError, match="cannot load DINOv3 checkpoint") as error:
        from_pretrained(tmp_path)
    message = str(error.value)
    assert missing in message and "layer.0.attention.k_proj.bias" in message and "norm.weight" in message
    with pytest.raises(ValueError, match="pos_interp"):
        from_pretrained(directory, pos_interp="hub")


def test_table_is_one_to_one(hf_models):
    """Every NNX parameter has exactly one row, and no torch name is used twice."""
    for kind in KINDS:
        torch_model, directory = hf_models[kind]
        cfg = dinov3_config_from_hf(json.loads((directory / "config.json").read_text()))
        rows = hf_key_table(cfg)
        params = nnx.state(nnx.eval_shape(lambda: DINOv3(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
        assert sorted(r.nnx_path for r in rows) == sorted(paths), kind
        memory = [n for r in rows for n in r.memory_names]
        assert len(memory) == len(set(memory))
        # Every torch parameter but the unused mask token is read exactly once.
        assert sorted(memory) == sorted(k for k in torch_model.state_dict() if k != "embeddings.mask_token"), kind


# The published facebook/dinov3-*-pretrain-lvd1689m configs (transformers convert_dinov3_vit_to_hf.py); every one
# has 4 registers, patch 16, eps 1e-5, RoPE base 100; gated MLPs use silu.
PUBLISHED = {
    "dinov3_vits16": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
    "dinov3_vits16plus": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                              use_gated_mlp=True),
    "dinov3_vitb16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "dinov3_vitl16": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "dinov3_vith16plus": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              use_gated_mlp=True),
    "dinov3_vit7b16": dict(hidden_size=4096, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
                           use_gated_mlp=True, query_bias=False, value_bias=False),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_match_published_configs(name):
    fields = PUBLISHED[name]
    hf = transformers.DINOv3ViTConfig(num_register_tokens=4, hidden_act="silu" if fields.get("use_gated_mlp") else
                                      "gelu", **fields)
    assert dinov3_config_from_hf(hf.to_dict()) == getattr(DINOv3Config, name)()


def test_config_from_hf_rejects_unsupported():
    config = transformers.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).to_dict()
    assert dinov3_config_from_hf(config).mlp_dim == 1536
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        dinov3_config_from_hf(config | {"use_gated_mlp": True})
    with pytest.raises(ValueError, match="mlp_bias"):
        dinov3_config_from_hf(config | {"mlp_bias": False})
    with pytest.raises(ValueError, match="divisible by 4"):
        dinov3_config_from_hf(config | {"hidden_size": 36, "num_attention_heads": 2})


def test_extract_features_tool(hf_models, tmp_path):
    spec = importlib.util.spec_from_file_location("extract_features", REPO / "tools" / "extract_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _, directory = hf_models["plain"]
    image = np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "frame.png")
    out = tmp_path / "feats.npz"
    argv = ["--encoder", str(directory), "--image", str(tmp_path / "frame.png"), "--out", str(out), "--dtype", "float32"]
    assert tool.main(argv) == 0
    features = np.load(out)["encoder"]
    assert features.shape == (4, 6, 32)  # 70x100 -> nearest multiples of 16: 64x96
    model = from_pretrained(directory)
    resized = np.asarray(Image.fromarray(image).resize((96, 64), Image.BILINEAR))
    expected = forward(model, normalize_images(jnp.asarray(resized))[None])  # the tool's normalisation
    np.testing.assert_allclose(features, np.asarray(patch_tokens(expected.last_hidden_state, model.cfg,
                                                                 expected.grid)[0]), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_flowfeat_forward_with_dinov3_encoder(hf_models):
    """FlowFeat builds a DINOv3 encoder from its config; encode() returns the torch model's hooked patch tokens."""
    torch_model = _tiny_hf("plain", num_layers=4)
    cfg = flowfeat_lib.FlowFeatConfig.from_encoder(dinov3_config_from_hf(torch_model.config.to_dict()), features=8)
    assert cfg.hooks == (0, 1, 2, 3) and cfg.decoder.widths == (32,) * 4 and cfg.decoder.patch_size == 16
    model = flowfeat_lib.FlowFeat(cfg, rngs=nnx.Rngs(0))
    assert isinstance(model.encoder, DINOv3)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    load_hf_state_dict(model.encoder, state)
    images = random_images(64, 96)
    _, expected_blocks, _ = _torch_outputs(torch_model, images)
    features = model.encode(jnp.asarray(images))
    prefix = cfg.encoder.num_prefix_tokens
    for ours, theirs in zip(features.hooked, expected_blocks):
        np.testing.assert_allclose(np.asarray(ours), theirs[:, prefix:].reshape(2, 4, 6, 32), atol=TOL, rtol=0)
    # The full forward is compiled and run by the train-step test below; here only its shapes (no compile).
    encoder_features, dense = nnx.eval_shape(lambda m, x: m(x), model, jnp.asarray(images))
    assert encoder_features.shape == (2, 4, 6, 32) and dense.shape == (2, 64, 96, 8)


def _tiny_dinov3_config(encoder_dir=""):
    """A 4-block width-32 DINOv3 at 64 px crops: seconds per step on CPU."""
    c = base_config()
    c.model.encoder = encoder_dir
    c.model.encoder_arch = "dinov3_vits16"
    for field, value in dict(hidden_size=32, num_layers=4, num_heads=2, mlp_dim=48).items():
        c.model.encoder_size[field] = value
    c.model.features = 8
    c.data.source = "synthetic"
    c.data.frame_size = 128
    c.data.flow_size = 64
    c.train.input_size = 64
    c.train.batch_size = 2
    return c


@pytest.mark.slow
def test_random_init_dinov3_flowfeat():
    model, source = build.build_flowfeat(_tiny_dinov3_config().model, seed=0)
    assert isinstance(model.encoder, DINOv3) and source == "random:dinov3_vits16:seed0"
    expected = dataclasses.replace(DINOv3Config.dinov3_vits16(), hidden_size=32, num_layers=4, num_heads=2, mlp_dim=48)
    assert model.encoder.cfg == expected


@pytest.mark.slow
def test_train_step_with_dinov3_checkpoint(tmp_path):
    """build_flowfeat loads a DINOv3 HF directory (ports.registry.from_pretrained) and the jitted step trains."""
    torch_model = _tiny_hf("swiglu", num_layers=4)
    torch_model.save_pretrained(tmp_path)
    config = _tiny_dinov3_config(str(tmp_path))
    model, source = build.build_flowfeat(config.model, config.seed)
    assert isinstance(model.encoder, DINOv3) and model.encoder.cfg.swiglu and source == str(tmp_path)
    np.testing.assert_array_equal(np.asarray(model.encoder.norm.scale[...]), torch_model.norm.weight.detach().numpy())
    graphdef, model_state = nnx.split(model)
    pure = nnx.to_pure_dict(model_state)
    tx = loop.make_optimizer(config.train, config.model.random_decoder)
    state = loop.init_train_state(pure["decoder"], tx, config.seed)
    train_step = jax.jit(step_lib.make_train_step(graphdef, tx, loop.step_config(config)))
    batches = synthetic.synthetic_batches(0, 2, 128, 64)
    for _ in range(2):
        state, metrics = train_step(state, next(batches), pure["encoder"])
        assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, pure["decoder"])
    assert any(jax.tree.leaves(changed))  # the decoder learned


@pytest.mark.parametrize("name", ["ytvos_dinov3_s16", "ytvos_dinov3_b16"])
def test_dinov3_configs(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    size = name[-3]
    assert config.model.encoder == f"facebook/dinov3-vit{size}16-pretrain-lvd1689m"
    assert config.train.batch_size == 128 and config.train.input_size == 224 and config.train.lr == 1e-4
    encoder = build.encoder_config(config.model)
    assert encoder == getattr(DINOv3Config, f"dinov3_vit{size}16")()
    assert flowfeat_lib.FlowFeatConfig.from_encoder(encoder).hooks == (2, 5, 8, 11)
