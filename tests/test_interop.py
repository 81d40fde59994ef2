"""Torch interop (issue 7): export to the reference FlowFeat layout, import released files, the torch FlowFeat.

Tiny random models (ViT width 32-64, 4 blocks, DPT d = 16) in f32 on both sides; parity max-abs-error <= 1e-4.
"""

import dataclasses
import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from flowfeat_jax.apps import torch_files
from flowfeat_jax.inference import load_flowfeat
from flowfeat_jax.models import vit as vit_lib
from flowfeat_jax.models.dpt import DPTConfig
from flowfeat_jax.models.flowfeat import FlowFeat, FlowFeatConfig, forward
from flowfeat_jax.models.vit import ViTConfig
from flowfeat_jax.ports import flowfeat as ports
from flowfeat_jax.ports.registry import from_pretrained
from flowfeat_jax.torch_ref.flowfeat import TorchFlowFeat, TorchFlowFeatConfig, infer_config, load_torch_flowfeat
from flowfeat_jax.torch_ref.vit import HubViT, HubViTConfig, mae_sincos_pos_embed

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4

_TINY = dict(hidden_size=32, num_layers=4, num_heads=2, mlp_dim=48, pos_interp="hub")
JAX_ENCODERS = {
    "dinov2": ViTConfig(family="dinov2", patch_size=14, layer_scale=True, pos_grid=37, **_TINY),
    "dinov2_registers": ViTConfig(family="dinov2", patch_size=14, layer_scale=True, pos_grid=37, num_registers=4,
                                  pos_antialias=True, **_TINY),
    "dino": ViTConfig(family="dino", patch_size=16, pos_grid=14, **_TINY),
    "mae": ViTConfig(family="mae", patch_size=16, pos_grid=14, **_TINY),
}


def _random_jax_flowfeat(vit_cfg: ViTConfig, seed: int = 0) -> FlowFeat:
    """FlowFeat with every parameter random (norm scales and layer-scale gammas around 1; MAE: sin-cos table)."""
    dpt = DPTConfig(vit_dim=vit_cfg.hidden_size, widths=(8, 16, 24, 32), features=16, patch_size=vit_cfg.patch_size)
    model = nnx.eval_shape(lambda: FlowFeat(FlowFeatConfig(vit_cfg, dpt, (0, 1, 2, 3)), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    for path, param in nnx.to_flat_state(params):
        value = rng.normal(0.0, 0.2, param.shape) + (path[-1] in ("scale", "gamma"))
        param.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, params)
    if vit_cfg.family == "mae":
        model.encoder.pos_embed.set_value(jnp.asarray(mae_sincos_pos_embed(vit_cfg.hidden_size, vit_cfg.pos_grid)))
    return model


def _random_torch_flowfeat(encoder: HubViTConfig, seed: int = 0, sincos: bool = False) -> TorchFlowFeat:
    """A reference-layout torch FlowFeat with random weights (d = 16, DPT widths as this project builds them)."""
    torch.manual_seed(seed)
    widths = (encoder.hidden_size,) * 4
    model = TorchFlowFeat(TorchFlowFeatConfig(encoder, widths, 16, (0, 1, 2, 3))).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            around_one = name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma"))
            param.copy_(0.2 * torch.randn_like(param) + around_one)
        if sincos:
            table = mae_sincos_pos_embed(encoder.hidden_size, encoder.pos_grid)
            model.encoder.pos_embed.copy_(torch.from_numpy(table))
    return model


def _images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def _torch_outputs(model: TorchFlowFeat, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        encoder, flowfeat = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    return encoder.permute(0, 2, 3, 1).numpy(), flowfeat.permute(0, 2, 3, 1).numpy()


def _assert_same_outputs(jax_model: FlowFeat, torch_model: TorchFlowFeat, sizes=(224, 448)) -> None:
    for size in sizes:
        images = _images(size)
        jax_encoder, jax_flowfeat = (np.asarray(a) for a in forward(jax_model, jnp.asarray(images)))
        torch_encoder, torch_flowfeat = _torch_outputs(torch_model, images)
        assert jax_flowfeat.shape == torch_flowfeat.shape == (2, size, size, 16)
        np.testing.assert_allclose(jax_encoder, torch_encoder, atol=TOL, rtol=0, err_msg=f"encoder at {size}")
        np.testing.assert_allclose(jax_flowfeat, torch_flowfeat, atol=TOL, rtol=0, err_msg=f"flowfeat at {size}")


def _tensors(state):
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


# --------------------------------------------------------------------------------------------------------------------
# Export: JAX -> reference layout -> torch FlowFeat
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(JAX_ENCODERS))
@pytest.mark.slow
def test_exported_weights_reproduce_jax_outputs_in_torch(name):
    model = _random_jax_flowfeat(JAX_ENCODERS[name])
    state = ports.flowfeat_state_dict(model)
    torch_model = load_torch_flowfeat(_tensors(state), num_heads=2).eval()  # strict load_state_dict
    _assert_same_outputs(model, torch_model)


def test_export_refuses_non_reference_hooks():
    model = _random_jax_flowfeat(dataclasses.replace(JAX_ENCODERS["dino"], num_layers=5))
    with pytest.raises(ValueError, match="hooks"):
        ports.flowfeat_state_dict(model)


# --------------------------------------------------------------------------------------------------------------------
# Key sets of the full-size released backbones, written out from the hub / reference module definitions
# --------------------------------------------------------------------------------------------------------------------


def _hub_encoder_keys(depth: int, dinov2: bool) -> set[str]:
    """facebookresearch/dino VisionTransformer, dinov2 DinoVisionTransformer (block_chunks=0: LayerScale ls1/ls2,
    mask_token) and the reference MAEEncoder (timm Block, no layer scale, no mask token); heads are Identity."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    block = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")]
    if dinov2:
        keys.add("mask_token")
        block += ["ls1.gamma", "ls2.gamma"]
    keys |= {f"blocks.{i}.{name}" for i in range(depth) for name in block}
    return {"encoder." + k for k in keys}


def _reference_decoder_keys() -> set[str]:
    """model.py DecodeDPT + util/dpt_blocks.py: postprocess convs, bias-free layerK_rn, fusion units, output convs."""
    convs = ["act_postprocess1.post.0", "act_postprocess1.post.1", "act_postprocess2.post.0", "act_postprocess2.post.1",
             "act_postprocess3.post.0", "act_postprocess4.post.0", "act_postprocess4.post.1", "scratch.output_conv0",
             "scratch.output_conv1.0", "scratch.output_conv1.2", "norm.norm"]
    convs += [f"scratch.refinenet{k}.resConfUnit{u}.conv{c}" for k in (1, 2, 3, 4) for u in (1, 2) for c in (1, 2)]
    keys = {f"{m}.{p}" for m in convs for p in ("weight", "bias")}
    keys |= {f"scratch.layer{k}_rn.weight" for k in (1, 2, 3, 4)}
    return {"decoder." + k for k in keys}


@pytest.mark.parametrize("preset, dinov2, shapes", [
    ("dinov2_vits14", True, {"encoder.pos_embed": (1, 1370, 384), "encoder.mask_token": (1, 384),
                             "encoder.patch_embed.proj.weight": (384, 3, 14, 14),
                             "encoder.blocks.11.attn.qkv.weight": (1152, 384), "encoder.blocks.0.ls1.gamma": (384,),
                             "decoder.act_postprocess1.post.1.weight": (384, 384, 4, 4)}),
    ("dino_vitb16", False, {"encoder.pos_embed": (1, 197, 768), "encoder.blocks.0.mlp.fc1.weight": (3072, 768),
                            "decoder.act_postprocess4.post.1.weight": (768, 768, 3, 3),
                            "decoder.scratch.layer1_rn.weight": (128, 768, 3, 3)}),
    ("mae_vitb16", False, {"encoder.pos_embed": (1, 197, 768),
                           "decoder.act_postprocess1.post.0.weight": (96, 768, 1, 1),
                           "decoder.act_postprocess2.post.1.weight": (192, 192, 2, 2),
                           "decoder.scratch.layer3_rn.weight": (128, 384, 3, 3), "decoder.norm.norm.weight": (128,)}),
])
def test_reference_key_set_of_released_backbones(preset, dinov2, shapes):
    cfg = FlowFeatConfig.from_encoder(getattr(ViTConfig, preset)(pos_interp="hub"))
    reference = ports.reference_shapes(cfg)  # abstract: no weights allocated
    assert set(reference) == _hub_encoder_keys(12, dinov2) | _reference_decoder_keys()
    for key, shape in shapes.items():
        assert reference[key] == shape, key
    with torch.device("meta"):  # the torch FlowFeat has the same keys and shapes
        torch_model = TorchFlowFeat(infer_config(reference))
    assert {k: tuple(v.shape) for k, v in torch_model.state_dict().items()} == reference
    assert torch_model.cfg.hooks == (2, 5, 8, 11) and torch_model.cfg.encoder.num_heads == cfg.encoder.num_heads


# --------------------------------------------------------------------------------------------------------------------
# Import: reference file -> run directory
# --------------------------------------------------------------------------------------------------------------------

_HUB_DINOV2 = HubViTConfig(patch_size=14, hidden_size=64, num_layers=4, num_heads=1, mlp_dim=128, layer_scale=True,
                           mask_token=True, pos_grid=37)
_HUB_DINOV2_REG = dataclasses.replace(_HUB_DINOV2, num_registers=2, pos_antialias=True)
_HUB_DINO = HubViTConfig(patch_size=16, hidden_size=64, num_layers=4, num_heads=2, mlp_dim=96, pos_grid=14)

_TINY_CONFIG = """
from flowfeat_jax.config import base_config

def get_config():
    config = base_config()
    config.model.encoder_arch = "dino_vits16"
    config.model.encoder_size.hidden_size = 64
    config.model.encoder_size.num_layers = 4
    config.model.encoder_size.num_heads = 2
    config.model.encoder_size.mlp_dim = 96
    config.train.batch_size = 4
    return config
"""


def _tool_main(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_released_file_imports_and_exports_back(tmp_path, capsys):
    """.pth in the reference layout -> import_torch -> JAX outputs equal torch's; export_torch gives the file back."""
    reference = _random_torch_flowfeat(_HUB_DINOV2_REG)
    torch.save(reference.state_dict(), tmp_path / "released.pth")
    argv = ["--pth", str(tmp_path / "released.pth"), "--out", str(tmp_path / "run"), "--num-heads", "1"]  # width 64
    assert _tool_main("import_torch")(argv) == 0
    model, config, step = load_flowfeat(tmp_path / "run")
    assert step == 0 and config.model.encoder == str(tmp_path / "run" / "encoder") and config.model.pos_interp == "hub"
    _assert_same_outputs(model, reference)

    out = tmp_path / "exported.safetensors"
    assert _tool_main("export_torch")(["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--safetensors"]) == 0
    assert "wrote" in capsys.readouterr().out
    exported = load_torch_flowfeat(out).state_dict()
    original = reference.state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():  # bitwise: the import/export tables are inverses, mask token kept
        torch.testing.assert_close(exported[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.slow
def test_training_snapshot_with_ema_and_config(tmp_path):
    """{"model": FlowFeatTrain state dict}: decoder -> online, decoder_ema.ema_model -> EMA; --config sets heads."""
    online = _random_torch_flowfeat(_HUB_DINO, seed=1)
    ema = _random_torch_flowfeat(_HUB_DINO, seed=2)
    state = dict(online.state_dict())
    for key, value in ema.state_dict().items():
        if key.startswith("decoder."):
            state["decoder_ema.ema_model." + key[len("decoder."):]] = value
            state["decoder_ema.online_model." + key[len("decoder."):]] = online.state_dict()[key]
    state["decoder_ema.initted"], state["decoder_ema.step"] = torch.tensor(True), torch.tensor(7)
    torch.save({"model": state, "optim": {}}, tmp_path / "snapshot.pth")
    (tmp_path / "tiny.py").write_text(_TINY_CONFIG)
    argv = ["--pth", str(tmp_path / "snapshot.pth"), "--out", str(tmp_path / "run"),
            "--config", str(tmp_path / "tiny.py")]
    assert _tool_main("import_torch")(argv) == 0
    ema_model, config, _ = load_flowfeat(tmp_path / "run", decoder="ema")
    assert config.train.batch_size == 4 and ema_model.cfg.encoder.family == "dino"
    assert ema_model.cfg.encoder.num_heads == 2
    ema.encoder.load_state_dict(online.encoder.state_dict())  # same frozen encoder, EMA decoder
    _assert_same_outputs(ema_model, ema, sizes=(224,))
    online_model, _, _ = load_flowfeat(tmp_path / "run")  # the online decoder by default (recipe.md step 12)
    _assert_same_outputs(online_model, online, sizes=(224,))
    for flag, source in (([], online), (["--decoder", "ema"], ema)):  # export_torch: online unless asked for EMA
        out = tmp_path / f"exported{len(flag)}.safetensors"
        argv = ["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--safetensors", *flag]
        assert _tool_main("export_torch")(argv) == 0
        exported = load_torch_flowfeat(out).state_dict()
        for key, value in source.state_dict().items():
            if key.startswith("decoder."):
                torch.testing.assert_close(exported[key], value, atol=0, rtol=0, msg=key)


def _valid_state() -> dict[str, torch.Tensor]:
    return dict(_random_torch_flowfeat(_HUB_DINOV2_REG).state_dict())


@pytest.mark.parametrize("missing, extra, shaped", [
    ("decoder.scratch.refinenet2.resConfUnit1.conv1.bias", None, None),
    ("encoder.blocks.3.ls2.gamma", None, None),
    (None, "encoder.blocks.0.attn.extra", None),
    (None, "head.weight", None),
    (None, None, "encoder.blocks.2.attn.proj.weight"),
    (None, None, "decoder.norm.norm.weight"),
    (None, None, "encoder.patch_embed.proj.bias"),
])
def test_bad_file_is_refused_and_nothing_written(tmp_path, capsys, missing, extra, shaped):
    state = _valid_state()
    if missing:
        del state[missing]
    if extra:
        state[extra] = torch.zeros(3)
    if shaped:
        state[shaped] = torch.zeros(*state[shaped].shape[:-1], state[shaped].shape[-1] + 1)
    named = missing or extra or shaped
    torch.save(state, tmp_path / "bad.pth")
    out = tmp_path / "run"
    argv = ["--pth", str(tmp_path / "bad.pth"), "--out", str(out), "--num-heads", "1"]  # width 64: not a released one
    assert _tool_main("import_torch")(argv) == 1
    error = capsys.readouterr().err
    assert named in error and len(error.strip().splitlines()) == 1
    assert error.count(" has shape ") <= 1 and error.count("key ") <= 1  # only the broken tensor is named
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]  # no run dir, no temp dir left behind


def test_existing_output_is_not_overwritten(tmp_path):
    torch.save(_valid_state(), tmp_path / "ok.pth")
    (tmp_path / "run").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        torch_files.import_flowfeat(tmp_path / "ok.pth", tmp_path / "run")


# --------------------------------------------------------------------------------------------------------------------
# The HF-format encoder directory: exact for transformers, MAE recognised by its table
# --------------------------------------------------------------------------------------------------------------------


def _hub_tokens(vit: HubViT, pixels: torch.Tensor) -> torch.Tensor:
    """Final-norm tokens of the last block (what transformers calls last_hidden_state)."""
    return vit.norm(vit(pixels, [vit.cfg.num_layers - 1])[0])


@pytest.mark.parametrize("hub, sincos, hf_class, family", [
    (_HUB_DINOV2_REG, False, transformers.Dinov2WithRegistersModel, "dinov2"),
    (_HUB_DINOV2, False, transformers.Dinov2Model, "dinov2"),
    (dataclasses.replace(_HUB_DINO, num_heads=1), True, transformers.ViTMAEModel, "mae"),
    (dataclasses.replace(_HUB_DINO, num_heads=1), False, transformers.ViTModel, "dino"),
])
def test_encoder_directory_is_exact_hf_checkpoint(tmp_path, hub, sincos, hf_class, family):
    reference = _random_torch_flowfeat(hub, sincos=sincos)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    cfg = ports.infer_flowfeat_config(state, num_heads=hub.num_heads)  # family from the keys / the sin-cos table
    assert cfg.encoder.family == family
    ports.write_hf_encoder(tmp_path / "encoder", {k: v for k, v in state.items() if k.startswith("encoder.")},
                           cfg.encoder)
    native = hub.pos_grid * hub.patch_size  # transformers and the hub resize positions differently elsewhere
    pixels = torch.from_numpy(_images(native)).permute(0, 3, 1, 2)
    extra = {"mask_ratio": 0.0} if family == "mae" else {}
    hf_model = hf_class.from_pretrained(tmp_path / "encoder", **extra).eval()
    call = {"noise": torch.arange(hub.pos_grid**2, dtype=torch.float32).expand(2, -1)} if family == "mae" else {}
    with torch.inference_mode():
        expected = _hub_tokens(reference.encoder, pixels)
        np.testing.assert_allclose(hf_model(pixels, **call).last_hidden_state.numpy(), expected.numpy(), atol=TOL)
    # Our loader reads the same directory with hub position resizing: equal to torch at another size too.
    jax_vit = from_pretrained(str(tmp_path / "encoder"), pos_interp="hub")
    for size in (224, 448):
        images = _images(size)
        out = vit_lib.forward(jax_vit, jnp.asarray(images))
        with torch.inference_mode():
            expected = _hub_tokens(reference.encoder, torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        np.testing.assert_allclose(np.asarray(out.last_hidden_state), expected, atol=TOL, rtol=0, err_msg=str(size))
