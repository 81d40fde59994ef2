"""FlowFeat from the `model` section of an experiment config: a pretrained encoder (through its port) or a seeded
random one, and a seeded DPT decoder. Above the ports because pretrained weights come through them."""

from __future__ import annotations

import dataclasses

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections

from flowfeat_jax.models import flowfeat as flowfeat_lib
from flowfeat_jax.ports import registry


def encoder_config(model_cfg: ml_collections.ConfigDict):
    """The config of a random-init encoder: the `encoder_arch` preset of any registered family (ViTConfig,
    DINOv3Config, ...; `ports.registry`) with the non-zero `encoder_size` entries."""
    sizes = {k: v for k, v in model_cfg.encoder_size.items() if v}
    try:
        return registry.preset_config(model_cfg.encoder_arch, **sizes, dtype=jnp.dtype(model_cfg.dtype))
    except ValueError as error:
        raise ValueError(f"model.encoder_arch: {error}") from error


def build_flowfeat(
    model_cfg: ml_collections.ConfigDict, seed: int, *, init_decoder: bool = True
) -> tuple[flowfeat_lib.FlowFeat, str]:
    """FlowFeat with its frozen encoder (pretrained weights or a seeded random init) and a seeded decoder.

    The model is built abstractly first, so weights that are loaded anyway are never randomly initialised; with
    `init_decoder=False` the decoder stays abstract for the caller to fill (from a checkpoint). Returns the module and
    a human-readable encoder source for checkpoint metadata.
    """
    dtype = jnp.dtype(model_cfg.dtype)
    if model_cfg.encoder:
        try:
            encoder = registry.from_pretrained(model_cfg.encoder, dtype=dtype, pos_interp=model_cfg.pos_interp or None)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"model.encoder: {error}") from None
        encoder_cfg, source = encoder.cfg, model_cfg.encoder
    else:
        encoder_cfg = encoder_config(model_cfg)
        if model_cfg.pos_interp:
            if not hasattr(encoder_cfg, "pos_interp"):
                raise ValueError(f"model.pos_interp: the {model_cfg.encoder_arch} encoder has no position table")
            encoder_cfg = dataclasses.replace(encoder_cfg, pos_interp=model_cfg.pos_interp)
        encoder = flowfeat_lib.build_encoder(encoder_cfg, rngs=nnx.Rngs(seed))
        source = f"random:{model_cfg.encoder_arch}:seed{seed}"
    cfg = flowfeat_lib.FlowFeatConfig.from_encoder(
        encoder_cfg, features=model_cfg.features, hooks=tuple(model_cfg.hooks) or None
    )
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, remat=bool(model_cfg.remat)))
    model = nnx.eval_shape(lambda: flowfeat_lib.FlowFeat(cfg, rngs=nnx.Rngs(seed)))
    model.encoder = encoder
    if init_decoder:
        # Its own stream, so the decoder init does not depend on how many random numbers the encoder drew.
        model.decoder = flowfeat_lib.DPT(cfg.decoder, rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(seed), 1)))
    return model, source
