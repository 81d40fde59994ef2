"""Decoder activation memory: in bf16 the backward pass keeps bf16 activations (f32 stays for the small maps only),
and `model.remat` (DPTConfig.remat) recomputes stages without changing the loss or its gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # the jaxpr-level residual list (jax.ad_checkpoint prints it)

from flowfeat_jax.config import cpu_config
from flowfeat_jax.models import dpt
from flowfeat_jax.ports import build

CFG = dpt.DPTConfig(vit_dim=32, widths=(32, 32, 32, 32), features=16, patch_size=14)
HW = (4 * 14, 4 * 14)


def _decoder_loss(cfg):
    """(loss, params): loss(params) = Σ D(grids) · c for fixed random grids and c in the compute dtype."""
    graphdef, params = nnx.split(dpt.DPT(cfg, rngs=nnx.Rngs(0)))
    keys = jax.random.split(jax.random.key(3), 5)
    grids = [jax.random.normal(k, (2, 4, 4, 32)).astype(cfg.dtype) for k in keys[:4]]
    cotangent = jax.random.normal(keys[4], (2, *HW, cfg.features)).astype(cfg.dtype)

    def loss(p):
        return jnp.sum((nnx.merge(graphdef, p)(grids, HW) * cotangent).astype(jnp.float32))

    return loss, params


def _residual_bytes(loss, params) -> dict[str, int]:
    """Bytes by dtype that the backward pass of `loss` keeps (params and closed-over inputs aside)."""
    by_dtype = {}
    for aval, source in saved_residuals(loss, params):
        if "from the argument" not in source:
            by_dtype[str(aval.dtype)] = by_dtype.get(str(aval.dtype), 0) + aval.size * aval.dtype.itemsize
    return by_dtype


def test_bf16_decoder_keeps_bf16_activations():
    f32 = _residual_bytes(*_decoder_loss(CFG))
    bf16 = _residual_bytes(*_decoder_loss(dataclasses.replace(CFG, dtype=jnp.bfloat16)))
    total_f32, total_bf16 = sum(f32.values()), sum(bf16.values())
    # Before the LayerNorm was rematerialised, flax's f32 normalisation kept three f32 full-resolution maps: 0.73x.
    assert total_bf16 < 0.6 * total_f32, (bf16, f32)
    assert bf16.get("float32", 0) < 0.02 * total_bf16, bf16


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients_with_fewer_residuals():
    loss, params = _decoder_loss(CFG)
    remat_loss, _ = _decoder_loss(dataclasses.replace(CFG, remat=True))
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    remat_value, remat_grads = jax.jit(jax.value_and_grad(remat_loss))(params)
    kept, remat_kept = _residual_bytes(loss, params), _residual_bytes(remat_loss, params)
    np.testing.assert_allclose(float(remat_value), float(value), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * max(1.0, float(np.abs(a).max())))
    assert sum(remat_kept.values()) < 0.5 * sum(kept.values()), (remat_kept, kept)


@pytest.mark.slow
def test_model_remat_reaches_the_decoder():
    config = cpu_config()
    config.model.remat = True
    model, _ = build.build_flowfeat(config.model, 0)
    assert model.cfg.decoder.remat and model.decoder.cfg.remat
