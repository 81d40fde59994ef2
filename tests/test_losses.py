"""Flow standardisation, losses and Eq. 7 (train/step.py flow_objective) vs the torch reference (torch_ref/train.py,
model.py FlowFeatTrain; NCHW on the torch side)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowfeat_jax import settings
from flowfeat_jax.config import base_config
from flowfeat_jax.torch_ref import train as torch_ref
from flowfeat_jax.train import losses
from flowfeat_jax.train import step as step_lib

TOL = 1e-4
RELEASED_LOSS = settings.LossConfig(**base_config().loss)  # grad_weight 1, flow_weight 0.1, sigma 0.1, L1


def _flows(seed, shape=(3, 2, 12, 10)):
    """Smooth-ish target with sharp edges plus a noisy prediction (NCHW numpy f32)."""
    rng = np.random.default_rng(seed)
    target = rng.normal(size=shape).cumsum(-1).astype(np.float32) * 0.1
    target[..., 4:, :] += 1.5  # a motion boundary
    pred = (target + 0.3 * rng.normal(size=shape)).astype(np.float32)
    return pred, target


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def test_standardize_flow_matches_torch():
    rng = np.random.default_rng(0)
    flow = (rng.normal(size=(4, 2, 7, 9)) * np.array([3.0, 0.02])[None, :, None, None] + 5).astype(np.float32)
    ours = np.asarray(losses.standardize_flow(_nhwc(flow))).transpose(0, 3, 1, 2)
    with torch.inference_mode():
        ref = torch_ref.standardize_flow(torch.from_numpy(flow)).numpy()
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    jitted = np.asarray(jax.jit(losses.standardize_flow)(_nhwc(flow))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(jitted, ref, atol=TOL, rtol=0)
    # Unbiased std: the standardised channel has (N-1)-std of 1/(1 + 1e-5/std), not the biased one.
    np.testing.assert_allclose(ours.std(axis=(2, 3), ddof=1), 1.0, atol=1e-3)
    with pytest.raises(ValueError, match="H\\*W > 1"):
        losses.standardize_flow(jnp.zeros((1, 1, 1, 2)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.slow
def test_losses_match_torch(seed):
    pred, target = _flows(seed)
    tp, tt = torch.from_numpy(pred), torch.from_numpy(target)
    jp, jt = _nhwc(pred), _nhwc(target)
    with torch.inference_mode():
        expected = {
            "l1": torch_ref.flow_l1_loss(tp, tt).item(),
            "l2": torch_ref.flow_l2_loss(tp, tt).item(),
            "focal": torch_ref.focal_gradient_loss(tp, tt, 0.1).item(),
            "focal_sigma1": torch_ref.focal_gradient_loss(tp, tt, 1.0).item(),
            "total": torch_ref.flow_objective(RELEASED_LOSS, tp, tt)["loss"].item(),
        }
    got = {
        "l1": losses.flow_l1_loss(jp, jt),
        "l2": losses.flow_l2_loss(jp, jt),
        "focal": losses.focal_gradient_loss(jp, jt, 0.1),
        "focal_sigma1": losses.focal_gradient_loss(jp, jt, 1.0),
        "total": 1.0 * losses.focal_gradient_loss(jp, jt, 0.1) + 0.1 * losses.flow_l1_loss(jp, jt),
    }
    for name, value in expected.items():
        assert abs(float(got[name]) - value) <= TOL, (name, float(got[name]), value)
    # The weights come from the target: swapping the arguments changes the value.
    assert abs(float(losses.focal_gradient_loss(jt, jp, 0.1)) - expected["focal"]) > 1e-3


def test_total_loss_gradient_matches_torch_autograd():
    pred, target = _flows(2)
    tp = torch.from_numpy(pred).requires_grad_(True)
    torch_ref.flow_objective(RELEASED_LOSS, tp, torch.from_numpy(target))["loss"].backward()
    total = lambda p, t: step_lib.flow_objective(RELEASED_LOSS, p, t)["loss"]  # noqa: E731
    grad = jax.jit(jax.grad(total))(_nhwc(pred), _nhwc(target))
    np.testing.assert_allclose(np.asarray(grad).transpose(0, 3, 1, 2), tp.grad.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "flow,flow_weight,grad_weight,sigma",
    [("l1", 0.1, 1.0, 0.1), ("l2", 0.1, 1.0, 0.1), ("l1", 0.0, 1.0, 0.1), ("l2", 0.7, 0.0, 0.1), ("l1", 2.0, 0.5, 1.0)],
)
def test_flow_objective_matches_torch_reference(flow, flow_weight, grad_weight, sigma):
    """Eq. 7 as shipped (step.flow_objective): every term, the weighted total and its gradient, L1 and L2."""
    cfg = dataclasses.replace(RELEASED_LOSS, flow=flow, flow_weight=flow_weight, grad_weight=grad_weight, sigma=sigma)
    pred, target = _flows(5)
    tp = torch.from_numpy(pred).requires_grad_(True)
    expected = torch_ref.flow_objective(cfg, tp, torch.from_numpy(target))
    expected["loss"].backward()
    terms, vjp = jax.vjp(lambda p: step_lib.flow_objective(cfg, p, _nhwc(target)), _nhwc(pred))
    assert set(terms) == set(expected) == {"loss", "flow_loss", "grad_loss"}
    for name in terms:
        assert abs(float(terms[name]) - expected[name].item()) <= TOL, (name, float(terms[name]), expected[name])
    # The total is the weighted sum of the terms it returns; L2 is not L1 (the switch is read).
    assert float(terms["loss"]) == pytest.approx(grad_weight * terms["grad_loss"] + flow_weight * terms["flow_loss"])
    other = losses.flow_l2_loss if flow == "l1" else losses.flow_l1_loss
    assert abs(float(terms["flow_loss"]) - float(other(_nhwc(pred), _nhwc(target)))) > 1e-3
    (grad,) = vjp({"loss": jnp.float32(1.0), "flow_loss": jnp.float32(0.0), "grad_loss": jnp.float32(0.0)})
    np.testing.assert_allclose(np.asarray(grad).transpose(0, 3, 1, 2), tp.grad.numpy(), atol=TOL, rtol=0)


@pytest.mark.slow
def test_focal_gradient_loss_on_flat_target_is_finite():
    """Reference: 0/0 = NaN on a channel with no target gradient; ours: that channel contributes 0."""
    pred, target = _flows(3)
    target[0, 1] = 0.7  # image 0, channel v: constant
    tp, tt = torch.from_numpy(pred), torch.from_numpy(target)
    with torch.inference_mode():
        assert torch.isnan(torch_ref.focal_gradient_loss(tp, tt, 0.1))
        # The reference value with the flat channel's terms replaced by 0 (mean still over all B·C terms): the
        # reference on each image and channel alone gives that term (x + y); the flat one is left out of the sum.
        expected = sum(
            torch_ref.focal_gradient_loss(tp[b : b + 1, c : c + 1], tt[b : b + 1, c : c + 1], 0.1).item()
            for b in range(3) for c in range(2) if (b, c) != (0, 1)
        ) / 6
    jp, jt = _nhwc(pred), _nhwc(target)
    value = float(losses.focal_gradient_loss(jp, jt, 0.1))
    assert np.isfinite(value) and abs(value - expected) <= TOL
    grad = jax.grad(losses.focal_gradient_loss, argnums=(0, 1))(jp, jt, 0.1)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grad)
    # A perfect prediction of an all-flat target: zero loss, not NaN.
    flat = jnp.full((1, 4, 4, 2), 0.3)
    assert float(losses.focal_gradient_loss(flat, flat, 0.1)) == 0.0


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        losses.flow_l1_loss(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 5, 2)))
    with pytest.raises(ValueError, match="one shape"):
        losses.focal_gradient_loss(jnp.zeros((4, 4, 2)), jnp.zeros((4, 4, 2)), 0.1)
