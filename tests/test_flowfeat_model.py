"""FlowFeat = DPT ∘ ViT: presets, hooks, output shapes and the frozen encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowfeat_jax.models.dpt import DPTConfig
from flowfeat_jax.models.flowfeat import FlowFeat, FlowFeatConfig, default_hooks, forward
from flowfeat_jax.models.vit import ViTConfig, patch_tokens

# Tiny DINOv2-style encoder with one register token, so dropping only the class token would be caught.
TINY_VIT = ViTConfig(
    family="dinov2", patch_size=8, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64, num_registers=1,
    layer_scale=True, pos_grid=4,
)


@pytest.fixture(scope="module")
def tiny_model() -> FlowFeat:
    return FlowFeat(FlowFeatConfig.from_encoder(TINY_VIT, features=16), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images() -> jax.Array:
    return jax.random.normal(jax.random.key(0), (2, 32, 48, 3))  # token grid 4x6


def test_default_hooks():
    assert default_hooks(12) == (2, 5, 8, 11)
    assert default_hooks(24) == (5, 11, 17, 23)
    assert default_hooks(40) == (9, 19, 29, 39)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        default_hooks(3)


@pytest.mark.parametrize(
    ("preset", "widths", "hooks"),
    [
        (ViTConfig.dino_vits16(), (384,) * 4, (2, 5, 8, 11)),
        (ViTConfig.dinov2_vitb14(), (768,) * 4, (2, 5, 8, 11)),
        (ViTConfig.dinov2_vitl14(), (1024,) * 4, (5, 11, 17, 23)),
        (ViTConfig.mae_vitb16(), (96, 192, 384, 768), (2, 5, 8, 11)),
        (ViTConfig.mae_vitl16(), (256, 512, 1024, 1024), (5, 11, 17, 23)),
    ],
)
def test_presets_follow_the_reference(preset, widths, hooks):
    cfg = FlowFeatConfig.from_encoder(preset)
    assert cfg.decoder.widths == widths
    assert cfg.hooks == hooks
    assert (cfg.decoder.vit_dim, cfg.decoder.patch_size, cfg.decoder.features) == (
        preset.hidden_size, preset.patch_size, 128
    )


def test_config_rejects_bad_hooks_and_mismatched_decoder():
    with pytest.raises(ValueError, match="4 increasing block indices"):
        FlowFeatConfig.from_encoder(TINY_VIT, hooks=(0, 2, 1, 3))
    with pytest.raises(ValueError, match="4 increasing block indices"):
        FlowFeatConfig.from_encoder(TINY_VIT, hooks=(0, 1, 2, 4))
    with pytest.raises(ValueError, match="does not fit the encoder"):
        FlowFeatConfig(TINY_VIT, DPTConfig(vit_dim=64, widths=(8,) * 4, patch_size=8), (0, 1, 2, 3))


@nnx.jit
def _forward_and_reference_parts(model: FlowFeat, images: jax.Array):
    """One compile for the model output, its encode() and the plain encoder run over every block."""
    everything = model.encoder(images)
    return model(images), model.encode(images), everything.hidden_states, everything.last_hidden_state


def test_forward_shapes_and_encoder_features(tiny_model, images):
    (enc, feats), encoded, all_blocks, last_normed = _forward_and_reference_parts(tiny_model, images)
    assert enc.shape == (2, 4, 6, 32)
    assert feats.shape == (2, 32, 48, 16)
    # Decoder output is LayerNorm'ed over channels (unit scale, zero bias at init).
    np.testing.assert_allclose(np.asarray(feats.mean(-1)), 0.0, atol=1e-5)

    grid = (4, 6)
    assert len(encoded.hooked) == 4
    for hooked, block in zip(encoded.hooked, tiny_model.cfg.hooks):
        expected = patch_tokens(all_blocks[block], TINY_VIT, grid)
        np.testing.assert_array_equal(np.asarray(hooked), np.asarray(expected))
    # The last hook is the last block here, so the ViT's own final norm gives the expected `final`.
    np.testing.assert_allclose(
        np.asarray(encoded.final), np.asarray(patch_tokens(last_normed, TINY_VIT, grid)), atol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(enc), np.asarray(encoded.final))


@pytest.mark.slow
def test_encoder_gets_no_gradient(tiny_model, images):
    def loss(model):
        enc, feats = model(images)
        # Channel weights: LayerNorm makes the plain sum of squares constant, with no gradient to the decoder convs.
        return jnp.sum(feats**2 * jnp.arange(16)) + jnp.sum(enc**2)

    grads = nnx.jit(nnx.grad(loss))(tiny_model)
    encoder_grads = jax.tree.leaves(grads["encoder"])
    decoder_grads = jax.tree.leaves(grads["decoder"])
    assert encoder_grads and all(not np.any(np.asarray(g)) for g in encoder_grads)
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["decoder"]["output_conv1b"]))
    assert sum(bool(np.any(np.asarray(g))) for g in decoder_grads) > len(decoder_grads) // 2


def test_odd_token_grid_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"40x48 does not fit patch size 8.*nearest valid height 32 or 48"):
        forward(tiny_model, jnp.zeros((1, 40, 48, 3)))


def test_decoder_init_follows_torch_defaults(tiny_model):
    """Conv kernels ~ U(±1/√fan_in) as torch's default (fan_in from torch weight dim 1); LayerNorm 1 and 0."""
    decoder = tiny_model.decoder  # widths (32,) * 4, features 16
    layers = [
        (decoder.act_postprocess1.project, 32),
        (decoder.act_postprocess1.resample, 32 * 4 * 4),  # ConvTranspose2d: dim 1 is the output width
        (decoder.act_postprocess4.resample, 32 * 3 * 3),
        (decoder.layer1_rn, 32 * 3 * 3),
        (decoder.output_conv1b, 16),
    ]
    for layer, fan_in in layers:
        bound = 1 / np.sqrt(fan_in)
        largest = np.abs(np.asarray(layer.kernel[...])).max()
        assert 0.8 * bound < largest <= bound, (layer, largest, bound)
    assert decoder.layer1_rn.bias is None
    np.testing.assert_array_equal(np.asarray(decoder.norm.scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(decoder.norm.bias[...]), 0.0)
