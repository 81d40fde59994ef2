"""eval.features: one feature function (so one compiled program) per model architecture, shared by every model."""

import numpy as np
from flax import nnx

from flowfeat_jax.eval import features
from flowfeat_jax.models.flowfeat import FlowFeat, FlowFeatConfig
from flowfeat_jax.models.vit import ViTConfig

TINY_VIT = ViTConfig(family="dinov2", patch_size=8, hidden_size=32, num_layers=4, num_heads=2, mlp_dim=64,
                     layer_scale=True, pos_grid=4)


def test_models_of_one_architecture_share_the_feature_function():
    trained, untrained = (FlowFeat(FlowFeatConfig.from_encoder(TINY_VIT, features=16), rngs=nnx.Rngs(seed))
                          for seed in (0, 1))
    assert features.model_feature_fns(trained)[0] is features.model_feature_fns(untrained)[0]
    assert features.model_feature_fns(trained, False)[0] is not features.model_feature_fns(trained)[0]
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 48, 3)).astype(np.uint8)
    out = {name: features.make_feature_fn(model)(frames) for name, model in (("a", trained), ("b", untrained))}
    assert out["a"]["encoder"].shape == (2, 4, 6, 32) and out["a"]["flowfeat"].shape == (2, 32, 48, 16)
    assert not np.allclose(out["a"]["flowfeat"], out["b"]["flowfeat"])  # same program, each model's own weights
    encoder_only = features.make_feature_fn(trained, "encoder")(frames)
    assert encoder_only["flowfeat"] is None
    np.testing.assert_allclose(encoder_only["encoder"], out["a"]["encoder"], atol=1e-5)
