"""EMA teacher decoder with the ema_pytorch warm-up schedule (recipe step 8; util/ema_pytorch.py `EMA`).

The reference wraps the decoder in `EMA(beta=0.999, update_after_step=1, update_every=5)` (inv_gamma 1,
power 2/3, min_value 0) and calls `update()` once after every optimiser step. Counting those calls k = 1, 2, …
(its `step` buffer holds k − 1 on entry and k after its increment):

- k = 1: the first call copies the online weights into the EMA (its `initted` flag);
- otherwise, if (k − 1) mod update_every = 0: copy again while k − 1 <= update_after_step, else
  ema ← ema + (1 − decay)·(online − ema) with `ema_decay(k)`;
- every other call leaves the EMA unchanged.

With the released values that is: copy at k = 1, then lerp at k = 6, 11, 16, … with decay 1 − (k − 1)^(−2/3)
capped at 0.999 (reached near k ≈ 31,600). ema_pytorch only tracks floating-point params and buffers; integer
leaves of the trees here are left as they are in the EMA tree.
"""

import jax
import jax.numpy as jnp


def ema_decay(
    update_count: jax.Array | int,
    beta: float = 0.999,
    power: float = 2 / 3,
    inv_gamma: float = 1.0,
    *,
    update_after_step: int = 1,
    min_value: float = 0.0,
) -> jax.Array:
    """Warm-up decay of ema_pytorch `EMA.get_current_decay`, evaluated on the k-th update call.

    epoch = max(k − update_after_step − 1, 0); decay = 0 if epoch = 0 else clip(1 − (1 + epoch/inv_gamma)^(−power),
    min_value, beta). With the defaults and k − 1 a multiple of 5 above 1 this is min(0.999, 1 − (k − 1)^(−2/3)).

    Args:
      update_count: k, the 1-based number of the update call (the reference's `step` after its increment).

    Returns:
      float32 scalar (or array shaped like `update_count`).
    """
    epoch = jnp.maximum(jnp.asarray(update_count, jnp.float32) - update_after_step - 1, 0.0)
    value = 1.0 - (1.0 + epoch / inv_gamma) ** (-power)
    return jnp.where(epoch > 0, jnp.clip(value, min_value, beta), 0.0)


def ema_update(
    ema_tree,
    online_tree,
    update_count: jax.Array | int,
    *,
    beta: float = 0.999,
    update_after_step: int = 1,
    update_every: int = 5,
    power: float = 2 / 3,
    inv_gamma: float = 1.0,
    min_value: float = 0.0,
):
    """One ema_pytorch `EMA.update()` call on pytrees, jit-safe (recipe step 8).

    Call it once after each optimiser step with update_count = k, the number of optimiser steps taken so far
    including this one (1 on the first step). See the module docstring for the schedule. beta = 1 freezes the
    EMA (lerp calls change nothing) as in ema_pytorch; copies still happen.

    Args:
      ema_tree: the EMA weights (any pytree of arrays).
      online_tree: the online weights, same structure.
      update_count: k >= 1, Python int or traced int scalar.

    Returns:
      (new_ema_tree, decay): decay is the float32 decay used, 0.0 on a copy call (ema ← online exactly) and 1.0 on
      a call that leaves the EMA unchanged.
    """
    k = jnp.asarray(update_count, jnp.int32)
    on_schedule = (k - 1) % update_every == 0
    copy = (k == 1) | (on_schedule & (k - 1 <= update_after_step))
    lerp = on_schedule & ~copy & (beta != 1.0)
    decay = ema_decay(k, beta, power, inv_gamma, update_after_step=update_after_step, min_value=min_value)
    decay = jnp.where(copy, 0.0, jnp.where(lerp, decay, 1.0)).astype(jnp.float32)

    def update_leaf(ema, online):
        if not jnp.issubdtype(jnp.result_type(ema), jnp.floating):
            return ema
        mixed = ema + (1.0 - decay) * (online - ema)  # torch lerp_ form for weights below 0.5
        return jnp.where(copy, online, jnp.where(lerp, mixed, ema)).astype(jnp.result_type(ema))

    return jax.tree.map(update_leaf, ema_tree, online_tree), decay
