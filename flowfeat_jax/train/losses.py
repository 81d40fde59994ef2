"""Flow normalisation and the FlowFeat training losses (recipe steps 2 and 6), channels-last.

Each mirrors a method of model.py `FlowFeatTrain` in the reference. Flows are (B, H, W, C) with C = 2 (u, v).
All losses return a float32 scalar; with the released config the total is
    1.0 · focal_gradient_loss(pred, target, sigma=0.1) + 0.1 · flow_l1_loss(pred, target).
"""

import jax
import jax.numpy as jnp

STANDARDIZE_EPS = 1e-5  # model.py FlowFeatTrain.forward, norm_flow


def _check_pair(pred: jax.Array, target: jax.Array) -> None:
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"pred and target must be (B, H, W, C) of one shape, got {pred.shape} and {target.shape}")


def standardize_flow(flow: jax.Array) -> jax.Array:
    """Per image and channel, (f − mean_HW) / (std_HW + 1e-5) with the unbiased (N − 1) std (recipe step 2).

    Mirrors the `norm_flow` branch of model.py `FlowFeatTrain.forward` (torch `Tensor.std` defaults to N − 1).

    Args:
      flow: (B, H, W, C), H·W > 1.

    Returns:
      (B, H, W, C) float32.
    """
    if flow.ndim != 4 or flow.shape[1] * flow.shape[2] < 2:
        raise ValueError(f"flow must be (B, H, W, C) with H*W > 1, got {flow.shape}")
    flow = flow.astype(jnp.float32)
    mean = jnp.mean(flow, axis=(1, 2), keepdims=True)
    std = jnp.std(flow, axis=(1, 2), keepdims=True, ddof=1)
    return (flow - mean) / (std + STANDARDIZE_EPS)


def flow_l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """L_L1 = mean over pixels of Σ_channels |Û − U| (recipe step 6; model.py `FlowFeatTrain.flow_l1`)."""
    _check_pair(pred, target)
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.sum(jnp.abs(diff), axis=-1))


def flow_l2_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean of (Û − U)² over all elements, the "L2" ablation (model.py `FlowFeatTrain.flow_l2` = F.mse_loss)."""
    _check_pair(pred, target)
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff))


def _focal_edge_l1(pred_edges: jax.Array, target_edges: jax.Array, sigma: float) -> jax.Array:
    """One axis of the focal gradient loss, model.py `FlowFeatTrain.edge_l1norm(x=pred, y=target)`.

    w = 1 − exp(−g/σ) from the target gradient magnitude g, normalised to sum 1 over H×W per image and channel;
    the loss per image and channel is Σ_HW w·|ĝ − g|, then averaged over images and channels.

    A target channel with no gradient anywhere has Σw = 0: the reference divides 0 by 0 and returns NaN. Here that
    image/channel contributes 0 (still counted in the mean). Whenever Σw > 0 the division is the reference's, so
    the two agree wherever the reference is finite. The double `where` keeps gradients finite too.
    """
    weight = 1.0 - jnp.exp(-target_edges / sigma)
    total = jnp.sum(weight, axis=(1, 2), keepdims=True)
    has_edges = total > 0
    weight = jnp.where(has_edges, weight / jnp.where(has_edges, total, 1.0), 0.0)
    return jnp.mean(jnp.sum(weight * jnp.abs(pred_edges - target_edges), axis=(1, 2)))


def focal_gradient_loss(pred: jax.Array, target: jax.Array, sigma: float = 0.1) -> jax.Array:
    """L_∇ = L_x + L_y, the focal flow-gradient loss (recipe step 6; model.py `FlowFeatTrain.flow_boundary_loss`).

    ĝ and g are absolute forward differences of the prediction Û and the target U along x (W) and y (H). The
    weights come from the target: the reference calls `flow_boundary_loss(teacher_flow2, student_flow, σ)` and
    `edge_l1norm(pred_d, gt_d)`, whose weight uses its second argument, the target's gradient.

    Args:
      pred: (B, H, W, C) ridge prediction Û.
      target: (B, H, W, C) teacher flow U.
      sigma: σ of the focal weight (released 0.1, `flow_edge_sigma`).

    Returns:
      float32 scalar.
    """
    _check_pair(pred, target)
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)

    def grad_x(f):
        return jnp.abs(f[:, :, :-1] - f[:, :, 1:])

    def grad_y(f):
        return jnp.abs(f[:, :-1] - f[:, 1:])

    loss_x = _focal_edge_l1(grad_x(pred), grad_x(target), sigma)
    loss_y = _focal_edge_l1(grad_y(pred), grad_y(target), sigma)
    return loss_x + loss_y
