"""DPT decoder: NNX vs the torch twin (reference key names), the port table, resizes and input checks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from flowfeat_jax.models import dpt, ops
from flowfeat_jax.ports.dpt import dpt_state_dict, load_dpt_state_dict
from flowfeat_jax.torch_ref.dpt import TorchDPT

TOL = 1e-4
TINY_WIDTHS = (8, 16, 32, 32)


def _expected_reference_keys() -> set[str]:
    """Key set of the reference DecodeDPT, written out from model.py / util/dpt_blocks.py (not from our modules)."""
    keys = set()
    for k in (1, 2, 4):  # conv1x1 + ConvTranspose2d / strided conv, both with bias
        keys |= {f"act_postprocess{k}.post.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    keys |= {"act_postprocess3.post.0.weight", "act_postprocess3.post.0.bias"}
    keys |= {f"scratch.layer{k}_rn.weight" for k in (1, 2, 3, 4)}  # bias=False
    keys |= {
        f"scratch.refinenet{k}.resConfUnit{u}.conv{c}.{p}"
        for k in (1, 2, 3, 4)
        for u in (1, 2)
        for c in (1, 2)
        for p in ("weight", "bias")
    }
    keys |= {f"scratch.output_conv{n}.{p}" for n in ("0", "1.0", "1.2") for p in ("weight", "bias")}
    keys |= {"norm.norm.weight", "norm.norm.bias"}
    return keys


def _torch_decoder(vit_dim, widths, features, patch_size, seed=0) -> TorchDPT:
    torch.manual_seed(seed)
    model = TorchDPT(vit_dim, widths, features, patch_size).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine so the port of norm.* is exercised
        model.norm.norm.weight.uniform_(0.5, 1.5)
        model.norm.norm.bias.uniform_(-0.5, 0.5)
    return model


def _nnx_decoder(vit_dim, widths, features, patch_size, dtype=jnp.float32) -> dpt.DPT:
    """An abstract decoder (shapes only, no init compute), to be filled by the loader."""
    cfg = dpt.DPTConfig(vit_dim=vit_dim, widths=widths, features=features, patch_size=patch_size, dtype=dtype)
    return nnx.eval_shape(lambda: dpt.DPT(cfg, rngs=nnx.Rngs(0)))


def _tiny_ported_decoder(seed: int, dtype=jnp.float32) -> dpt.DPT:
    """Tiny MAE-style decoder holding the random weights of a seeded torch twin."""
    reference = _torch_decoder(32, TINY_WIDTHS, 16, 14, seed)
    return load_dpt_state_dict(_nnx_decoder(32, TINY_WIDTHS, 16, 14, dtype), reference.state_dict())


@functools.partial(nnx.jit, static_argnames="out_hw")
def _decode(decoder: dpt.DPT, hooked, out_hw):
    """Jitted decoder with its four scratch inputs (one compile is far cheaper than eager op-by-op on CPU)."""
    posts = (decoder.act_postprocess1, decoder.act_postprocess2, decoder.act_postprocess3, decoder.act_postprocess4)
    rns = (decoder.layer1_rn, decoder.layer2_rn, decoder.layer3_rn, decoder.layer4_rn)
    stages = [rn(post(x)) for x, post, rn in zip(hooked, posts, rns)]
    return stages, decoder(hooked, out_hw)


def _to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.slow
def test_conv_transpose_one_layer_parity(factor):
    torch.manual_seed(factor)
    layer = torch.nn.ConvTranspose2d(6, 6, factor, stride=factor).eval()
    cfg = dpt.DPTConfig(vit_dim=6, widths=(6,) * 4, features=4)
    ours = dpt.PatchUpsample(cfg, 6, factor, rngs=nnx.Rngs(0))
    ours.kernel[...] = jnp.asarray(layer.weight.detach().numpy().transpose(2, 3, 1, 0))
    ours.bias[...] = jnp.asarray(layer.bias.detach().numpy())
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 6))
    with torch.inference_mode():
        expected = layer(_to_nchw(x)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(ours(x))
    assert got.shape == (2, 3 * factor, 5 * factor, 6)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("in_hw", "out_hw", "align_corners"),
    [((4, 6), (8, 12), True), ((1, 3), (2, 6), True), ((32, 48), (56, 84), False), ((9, 7), (4, 5), False)],
)
def test_resize_bilinear_matches_torch(in_hw, out_hw, align_corners):
    x = jax.random.normal(jax.random.key(1), (2, *in_hw, 3))
    expected = F.interpolate(_to_nchw(x), out_hw, mode="bilinear", align_corners=align_corners)
    got = np.asarray(dpt.resize_bilinear(x, out_hw, align_corners=align_corners))
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("widths", "patch_size", "grid"),
    [(TINY_WIDTHS, 14, (4, 6)), ((16, 16, 16, 16), 16, (6, 2))],  # MAE-style unequal / ViT-style equal widths
)
@pytest.mark.slow
def test_dpt_parity_with_torch(widths, patch_size, grid):
    vit_dim, features = 32, 16
    hw = (grid[0] * patch_size, grid[1] * patch_size)
    reference = _torch_decoder(vit_dim, widths, features, patch_size)
    ours = load_dpt_state_dict(_nnx_decoder(vit_dim, widths, features, patch_size), reference.state_dict())

    keys = jax.random.split(jax.random.key(2), 4)
    grids = [jax.random.normal(k, (2, *grid, vit_dim)) for k in keys]
    cls = np.ones((2, 1, vit_dim), np.float32)  # must be dropped by the torch side
    tokens = [torch.from_numpy(np.concatenate([cls, np.asarray(g).reshape(2, -1, vit_dim)], 1)) for g in grids]
    with torch.inference_mode():
        expected_stages = reference.reassemble(tokens, hw)
        expected = reference(tokens, hw)
        from_grids = reference([_to_nchw(g) for g in grids], hw)  # the torch twin also takes (B, C, h, w) grids
    torch.testing.assert_close(from_grids, expected, atol=0, rtol=0)

    stages, got = _decode(ours, grids, hw)
    for k, (stage, want) in enumerate(zip(stages, expected_stages)):
        want = want.permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(stage), want, atol=TOL, rtol=0, err_msg=f"layer{k + 1}")

    got = np.asarray(got)
    assert got.shape == (2, *hw, features)
    err = np.abs(got - expected.permute(0, 2, 3, 1).numpy()).max()
    assert err <= TOL, f"DPT max abs error {err}"


def test_state_dict_keys_are_the_reference_names():
    expected = _expected_reference_keys()
    assert set(TorchDPT(32, TINY_WIDTHS, 16, 14).state_dict()) == expected
    assert set(dpt_state_dict(_tiny_ported_decoder(seed=0))) == expected


def test_round_trip_nnx_to_state_dict_to_nnx():
    reference = _torch_decoder(32, TINY_WIDTHS, 16, 14, seed=3)
    source = load_dpt_state_dict(_nnx_decoder(32, TINY_WIDTHS, 16, 14), reference.state_dict())
    exported = dpt_state_dict(source)
    # Back in torch layout every tensor is the original one, and it loads under strict key and shape checks.
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    TorchDPT(32, TINY_WIDTHS, 16, 14).load_state_dict({k: torch.tensor(v) for k, v in exported.items()})
    target = load_dpt_state_dict(_nnx_decoder(32, TINY_WIDTHS, 16, 14), exported)
    src_leaves = jax.tree.leaves(nnx.state(source, nnx.Param))
    dst_leaves = jax.tree.leaves(nnx.state(target, nnx.Param))
    assert len(src_leaves) == len(dst_leaves) == len(exported)
    for a, b in zip(src_leaves, dst_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_is_strict_and_lists_every_problem():
    state = dict(TorchDPT(32, TINY_WIDTHS, 16, 14).state_dict())
    del state["scratch.output_conv0.bias"]
    state["scratch.extra.weight"] = torch.zeros(1)
    state["scratch.layer2_rn.weight"] = torch.zeros(16, 8, 3, 3)  # in-channels 8 where 16 is expected
    with pytest.raises(ValueError) as info:
        load_dpt_state_dict(_nnx_decoder(32, TINY_WIDTHS, 16, 14), state)
    message = str(info.value)
    assert "missing torch key scratch.output_conv0.bias" in message
    assert "unexpected torch key scratch.extra.weight" in message
    assert "scratch.layer2_rn.weight: shape" in message


def test_check_token_grid():
    assert dpt.check_token_grid(224, 448, 14) == (16, 32)
    with pytest.raises(ValueError, match=r"230x224 .* patch size 14.*multiples of 28.*height 224 or 252, width 224"):
        dpt.check_token_grid(230, 224, 14)
    with pytest.raises(ValueError, match=r"height 480 or 512"):  # 496 = 31 patches of 16: an odd grid
        dpt.check_token_grid(496, 512, 16)


def test_decoder_rejects_bad_grids_with_a_clear_error():
    decoder = _nnx_decoder(32, TINY_WIDTHS, 16, 14)
    grids = [jnp.zeros((1, 4, 6, 32))] * 4
    with pytest.raises(ValueError, match="70x84"):
        decoder(grids, (70, 84))
    with pytest.raises(ValueError, match=r"hooked grid 2 has shape \(1, 4, 6, 8\)"):
        decoder(grids[:2] + [jnp.zeros((1, 4, 6, 8))] + grids[3:], (56, 84))


@pytest.mark.slow
def test_bf16_compute_keeps_f32_params_and_stays_close():
    source = _tiny_ported_decoder(seed=5)
    half = _tiny_ported_decoder(seed=5, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(half, nnx.Param))} == {jnp.dtype(jnp.float32)}
    grids = [jax.random.normal(k, (1, 4, 6, 32)) for k in jax.random.split(jax.random.key(6), 4)]
    _, got = _decode(half, grids, (56, 84))
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - np.asarray(_decode(source, grids, (56, 84))[1])).max()
    assert err < 0.1, f"bf16 vs f32 max abs error {err}"
    # Every layer carries the compute dtype, and param_dtype reaches every parameter (abstract init, no compute).
    layer_types = (dpt.Conv, dpt.PatchUpsample, nnx.Conv, nnx.LayerNorm)
    layers = [m for _, m in nnx.iter_modules(half) if isinstance(m, layer_types)]
    assert len(layers) == 4 + 3 + 4 + 4 * 4 + 3 + 1
    assert all(layer.dtype == jnp.bfloat16 for layer in layers)
    bf16_cfg = dataclasses.replace(half.cfg, param_dtype=jnp.bfloat16)
    bf16_params = nnx.eval_shape(lambda: dpt.DPT(bf16_cfg, rngs=nnx.Rngs(0)))
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(bf16_params, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_tap_weight_grad_matches_lax(kernel_size):
    kx, kg = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (2, 9, 7, 5))
    grad_out = jax.random.normal(kg, (2, 9, 7, 6))
    kernel = jnp.zeros((kernel_size, kernel_size, 5, 6))
    expected = jax.vjp(lambda w: ops.lax_same_conv(x, w), kernel)[1](grad_out)[0]
    got = ops.tap_weight_grad(x, grad_out, kernel_size)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tap_threshold", [0, 2**62])  # per-tap weight gradient on CPU / XLA's own
@pytest.mark.slow
def test_dpt_gradients_match_torch(monkeypatch, tap_threshold):
    """d⟨D(hooked), g⟩ / dθ for every weight equals torch autograd on the twin, through either weight-gradient path
    of the 3×3 convs, the matmul 1×1 convs and the matmul patch upsampling."""
    monkeypatch.setattr(ops, "TAP_WEIGHT_GRAD_MIN_ELEMENTS", tap_threshold)
    hw = (4 * 14, 6 * 14)
    reference = _torch_decoder(32, TINY_WIDTHS, 16, 14, seed=4)
    ours = load_dpt_state_dict(_nnx_decoder(32, TINY_WIDTHS, 16, 14), reference.state_dict())
    keys = jax.random.split(jax.random.key(8), 5)
    grids = [jax.random.normal(k, (2, 4, 6, 32)) for k in keys[:4]]
    cotangent = jax.random.normal(keys[4], (2, *hw, 16))

    graphdef, params = nnx.split(ours)
    grads = jax.jit(jax.grad(lambda p: jnp.vdot(nnx.merge(graphdef, p)(grids, hw), cotangent)))(params)
    nnx.update(ours, grads)  # the gradient in the decoder's own layout, exported by the port table
    got = dpt_state_dict(ours)

    out = reference([_to_nchw(g) for g in grids], hw)
    (out * _to_nchw(cotangent)).sum().backward()
    for name, param in reference.named_parameters():
        if "refinenet4.resConfUnit1" in name:  # never applied: no gradient in torch, zeros here
            assert param.grad is None and not got[name].any(), name
            continue
        want = param.grad.numpy()
        scale = np.abs(want).max()
        np.testing.assert_allclose(got[name], want, atol=1e-4 * scale, rtol=0, err_msg=name)
