"""bf16 compute (f32 params, f32 ridge and losses) follows the f32 training curve."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_train_loop import read_metrics

from flowfeat_jax.ports import build
from flowfeat_jax.train import loop


def losses(tmp_path, dtype):
    config = tiny_config(num_steps=20)
    config.model.dtype = dtype
    config.train.batch_size = 4
    config.train.lr = 1e-3
    loop.train(config, tmp_path / dtype)
    return np.array([m["loss"] for m in read_metrics(tmp_path / dtype)])


@pytest.mark.slow
def test_bf16_training_follows_f32_curve(tmp_path):
    f32, bf16 = losses(tmp_path, "float32"), losses(tmp_path, "bfloat16")
    relative = np.abs(bf16 - f32) / f32
    # Measured on CPU over 20 steps: max 1.5 %, mean 0.7 %.
    assert relative.max() < 0.05 and relative.mean() < 0.015, relative


def test_bf16_model_keeps_f32_params():
    config = tiny_config()
    config.model.dtype = "bfloat16"
    model, _ = build.build_flowfeat(config.model, 0)
    assert model.cfg.encoder.dtype == jnp.bfloat16 and model.cfg.decoder.dtype == jnp.bfloat16
    import flax.nnx as nnx
    import jax

    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))}
    assert dtypes == {jnp.dtype(jnp.float32)}
