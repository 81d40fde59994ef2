"""The pure FlowFeat train step: `state, metrics = train_step(state, batch, encoder_params)`.

One sample (recipe.md "One training sample", steps 2-8; mirrors model.py FlowFeatTrain.forward):
  1. the square frame is ImageNet-normalised; its flow (already in normalised units) is standardised per image;
  2. two affine crops (theta1, theta2) drawn from `fold_in(rng, step)` sample the frame and the flow;
  3. the frozen encoder embeds both crops in one batched call; the EMA decoder embeds crop 1, the online decoder crop 2;
  4. a ridge regression fits crop 1's flow from the EMA features, the map is applied to the online features (the
     Tab. 3 "naive" ablation, `flow_map='linear'`, applies one learned linear layer to the online features instead);
  5. loss = grad_weight * L_grad + flow_weight * L_flow; AdamW on the decoder; EMA update (ema_pytorch schedule).
A step whose loss, gradient norm or update norm is not finite leaves params, EMA and optimiser state untouched (inside
jit, no host round trip) and is counted.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.nnx as nnx
import flax.struct
import jax
import jax.numpy as jnp
import optax

from flowfeat_jax import settings
from flowfeat_jax.models import ops
from flowfeat_jax.models.vit import normalize_images
from flowfeat_jax.train import crops, ema, losses, ridge

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything that decides the future of a run (the frozen encoder is passed separately and never donated)."""

    step: jax.Array  # int32 scalar: optimiser steps taken so far
    params: PyTree  # online decoder parameters (pure dict)
    ema_params: PyTree  # EMA teacher decoder parameters (pure dict)
    opt_state: PyTree
    rng: jax.Array  # uint32 key data; per-step randomness is fold_in(rng, step)
    nonfinite: jax.Array  # int32: consecutive non-finite steps (reset by a finite one)
    nonfinite_total: jax.Array  # int32: all non-finite steps of the run
    # The learned (d + 1, c) features -> flow map of the `flow_map='linear'` ablation (trained with the decoder by
    # the same optimiser; opt_state then covers {"decoder", "flow_head"}); None for the released per-image ridge map.
    flow_head: PyTree = None


def update_is_finite(loss: jax.Array, grad_norm: jax.Array, updates: PyTree) -> jax.Array:
    """Whether a step may be written. What would be written decides: a finite gradient can still give a non-finite
    update (lr = nan, overflow)."""
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))


def keep_if_finite(finite: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """`new` after a finite step, else `old`, leaf by leaf inside jit: a non-finite step changes nothing."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step (recipe.md steps 2-8 and the paper's ablation switches)."""

    crop: settings.CropConfig
    loss: settings.LossConfig
    ema: settings.EmaConfig

    @classmethod
    def from_sections(cls, train: Mapping, loss: Mapping, ema: Mapping) -> StepConfig:
        """From the config sections `train` (its crop fields), `loss` and `ema` (whole; flowfeat_jax/settings.py)."""
        return cls(
            crop=settings.from_section(settings.CropConfig, train),
            loss=settings.LossConfig(**loss),
            ema=settings.EmaConfig(**ema),
        )


def flow_objective(cfg: settings.LossConfig, pred: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Eq. 7, recipe.md step 6: total = grad_weight * L_grad + flow_weight * L_flow (model.py FlowFeatTrain.forward)."""
    flow_term = losses.flow_l1_loss(pred, target) if cfg.flow == "l1" else losses.flow_l2_loss(pred, target)
    grad_term = losses.focal_gradient_loss(pred, target, cfg.sigma)
    total = cfg.grad_weight * grad_term + cfg.flow_weight * flow_term
    return {"loss": total, "flow_loss": flow_term, "grad_loss": grad_term}


def init_flow_head(seed: int, features: int, channels: int = 2) -> jax.Array:
    """The (features + 1, channels) map of the `flow_map='linear'` ablation, bias as the last row (the layout of
    `ridge.ridge_solve`'s weights), uniform in +-1/sqrt(features) like torch's nn.Linear(features, channels)."""
    bound = 1.0 / features**0.5
    key = jax.random.fold_in(jax.random.key(seed), 0x48454144)  # a stream of its own, apart from the crop keys
    return jax.random.uniform(key, (features + 1, channels), jnp.float32, -bound, bound)


def trainable_params(state: TrainState) -> PyTree:
    """What the optimiser updates: the online decoder, plus the learned flow map of the 'linear' ablation."""
    if state.flow_head is None:
        return state.params
    return {"decoder": state.params, "flow_head": state.flow_head}


def step_crops(state: TrainState, batch_size: int, frame_side: int, crop_scale) -> tuple[jax.Array, jax.Array]:
    """The two crop thetas (B, 2, 3) of the step at `state.step`: keys split from fold_in(state.rng, state.step)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    key_crop1, key_crop2 = jax.random.split(rng)
    theta1 = crops.sample_crop_params(key_crop1, batch_size, crop_scale, image_size=frame_side)
    theta2 = crops.sample_crop_params(key_crop2, batch_size, crop_scale, image_size=frame_side)
    return theta1, theta2


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: StepConfig
) -> Callable[[TrainState, dict, PyTree], tuple[TrainState, dict]]:
    """Builds the pure step for a FlowFeat graph (`graphdef` of a FlowFeat module split into encoder/decoder dicts).

    The returned function is not jitted; `jit_train_step` does that with the state donated.
    """
    if cfg.loss.flow not in ("l1", "l2"):
        raise ValueError(f"loss.flow must be 'l1' or 'l2', got {cfg.loss.flow!r}")
    if cfg.loss.flow_map not in ("ridge", "linear"):
        raise ValueError(f"loss.flow_map must be 'ridge' or 'linear', got {cfg.loss.flow_map!r}")
    learned_map = cfg.loss.flow_map == "linear"
    if cfg.crop.input_size % 2:
        raise ValueError(f"train.input_size must be even, got {cfg.crop.input_size}")

    def model_with(encoder_params, decoder_params):
        return nnx.merge(graphdef, {"encoder": encoder_params, "decoder": decoder_params})

    def train_step(state: TrainState, batch: dict, encoder_params: PyTree) -> tuple[TrainState, dict]:
        if learned_map != (state.flow_head is not None):
            raise ValueError(f"loss.flow_map={cfg.loss.flow_map!r} needs a train state "
                             f"{'with' if learned_map else 'without'} a flow_head "
                             "(loop.init_train_state(..., flow_head=...))")
        frames = normalize_images(batch["frame"])
        flow = batch["flow"].astype(jnp.float32)
        if cfg.loss.norm_flow:
            flow = losses.standardize_flow(flow)
        batch_size, frame_side = frames.shape[0], frames.shape[1]
        out_hw = (cfg.crop.input_size, cfg.crop.input_size)
        theta1, theta2 = step_crops(state, batch_size, frame_side, cfg.crop.crop_scale)
        crop1, crop2 = crops.affine_crop(frames, theta1, out_hw), crops.affine_crop(frames, theta2, out_hw)
        flow1, flow2 = crops.affine_crop(flow, theta1, out_hw), crops.affine_crop(flow, theta2, out_hw)

        if learned_map:  # Tab. 3 naive: no teacher, no crop-1 regression; crop 1's key is drawn all the same
            hooked2 = model_with(encoder_params, state.params).encode(crop2).hooked
            coef = None
        else:
            # The frozen encoder sees both crops in one call; its outputs carry no gradient.
            encoded = model_with(encoder_params, state.params).encode(jnp.concatenate([crop1, crop2]))
            hooked1 = [h[:batch_size] for h in encoded.hooked]
            hooked2 = [h[batch_size:] for h in encoded.hooked]
            teacher_params = state.ema_params if cfg.ema.enabled else state.params
            teacher = jax.lax.stop_gradient(model_with(encoder_params, teacher_params).decoder(hooked1, out_hw))
            # The ridge map depends only on the teacher, so it is solved once outside the differentiated function.
            coef = ridge.ridge_solve(teacher, flow1, cfg.loss.ridge_alpha)
            # On CPU the student pass starts once the ridge is solved (ops.run_after says why).
            hooked2 = ops.run_after(hooked2, coef)

        def loss_fn(trainable):
            params, weights = (trainable["decoder"], trainable["flow_head"]) if learned_map else (trainable, coef)
            student = model_with(encoder_params, params).decoder(hooked2, out_hw)
            if learned_map:  # one map for every image: the ridge map's (B, d + 1, c) layout, broadcast
                weights = jnp.broadcast_to(weights, (batch_size, *weights.shape))
            pred = ridge.ridge_predict(student, weights)
            terms = flow_objective(cfg.loss, pred, flow2)
            return terms["loss"], terms

        trainable = trainable_params(state)
        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trained = optax.apply_updates(trainable, updates)
        params, flow_head = (trained["decoder"], trained["flow_head"]) if learned_map else (trained, None)
        ema_params, decay = ema.ema_update(
            state.ema_params,
            params,
            state.step + 1,
            beta=cfg.ema.beta,
            update_after_step=cfg.ema.update_after_step,
            update_every=cfg.ema.update_every,
            power=cfg.ema.power,
            inv_gamma=cfg.ema.inv_gamma,
        )

        finite = update_is_finite(terms["loss"], grad_norm, updates)
        keep = functools.partial(keep_if_finite, finite)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            ema_params=keep(ema_params, state.ema_params),
            opt_state=keep(opt_state, state.opt_state),
            flow_head=keep(flow_head, state.flow_head),
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32),
            nonfinite_total=(state.nonfinite_total + (~finite).astype(jnp.int32)),
        )
        # The schedule's decay at this step (what a lerp would use now), not the 1.0 of steps that skip the update.
        schedule_decay = ema.ema_decay(
            state.step + 1, cfg.ema.beta, cfg.ema.power, cfg.ema.inv_gamma, update_after_step=cfg.ema.update_after_step
        )
        metrics = dict(terms, grad_norm=grad_norm, ema_decay=schedule_decay, ema_updated=decay < 1.0, finite=finite)
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable) -> Callable:
    """Jits the step with the train state donated (the encoder params, argument 2, are not)."""
    return jax.jit(train_step, donate_argnums=(0,))
