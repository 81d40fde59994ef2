"""Flow standardisation and losses vs torch transcriptions of model.py FlowFeatTrain (NCHW on the torch side)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowfeat_jax.train import losses

TOL = 1e-4


def _torch_standardize(flow):
    return (flow - flow.mean((2, 3), keepdim=True)) / (flow.std((2, 3), keepdim=True) + 1e-5)


def _torch_l1(pred, target):
    return torch.abs(pred - target).sum(1, keepdim=True).mean()


def _torch_focal_gradient(target, pred, sigma):
    """flow_boundary_loss(gt_flow, pred_flow) with edge_l1norm(x=pred_d, y=gt_d), as model.py composes them."""

    def edge_l1norm(x, y):
        w = 1.0 - torch.exp(-y / sigma)
        w = w / w.sum((-1, -2), keepdim=True)
        return (w * torch.abs(x - y)).sum((-1, -2))

    dx = lambda f: torch.abs(f[:, :, :, :-1] - f[:, :, :, 1:])  # noqa: E731
    dy = lambda f: torch.abs(f[:, :, :-1, :] - f[:, :, 1:, :])  # noqa: E731
    return edge_l1norm(dx(pred), dx(target)).mean() + edge_l1norm(dy(pred), dy(target)).mean()


def _torch_total(pred, target, sigma=0.1):
    return 0.1 * _torch_l1(pred, target) + 1.0 * _torch_focal_gradient(target, pred, sigma)


def _jax_total(pred, target, sigma=0.1):
    return 1.0 * losses.focal_gradient_loss(pred, target, sigma) + 0.1 * losses.flow_l1_loss(pred, target)


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
        ref = _torch_standardize(torch.from_numpy(flow)).numpy()
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    jitted = np.asarray(jax.jit(losses.standardize_flow)(_nhwc(flow))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(jitted, ref, atol=TOL, rtol=0)
    # Unbiased std: the standardised channel has (N-1)-std of 1/(1 + 1e-5/std), not the biased one.
    np.testing.assert_allclose(ours.std(axis=(2, 3), ddof=1), 1.0, atol=1e-3)
    with pytest.raises(ValueError, match="H\\*W > 1"):
        losses.standardize_flow(jnp.zeros((1, 1, 1, 2)))


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_torch(seed):
    pred, target = _flows(seed)
    tp, tt = torch.from_numpy(pred), torch.from_numpy(target)
    jp, jt = _nhwc(pred), _nhwc(target)
    with torch.inference_mode():
        expected = {
            "l1": _torch_l1(tp, tt).item(),
            "l2": F.mse_loss(tp, tt).item(),
            "focal": _torch_focal_gradient(tt, tp, 0.1).item(),
            "focal_sigma1": _torch_focal_gradient(tt, tp, 1.0).item(),
            "total": _torch_total(tp, tt).item(),
        }
    got = {
        "l1": losses.flow_l1_loss(jp, jt),
        "l2": losses.flow_l2_loss(jp, jt),
        "focal": losses.focal_gradient_loss(jp, jt, 0.1),
        "focal_sigma1": losses.focal_gradient_loss(jp, jt, 1.0),
        "total": _jax_total(jp, jt),
    }
    for name, value in expected.items():
        assert abs(float(got[name]) - value) <= TOL, (name, float(got[name]), value)
    # The weights come from the target: swapping the arguments changes the value.
    assert abs(float(losses.focal_gradient_loss(jt, jp, 0.1)) - expected["focal"]) > 1e-3


def test_total_loss_gradient_matches_torch_autograd():
    pred, target = _flows(2)
    tp = torch.from_numpy(pred).requires_grad_(True)
    _torch_total(tp, torch.from_numpy(target)).backward()
    grad = jax.jit(jax.grad(_jax_total))(_nhwc(pred), _nhwc(target))
    np.testing.assert_allclose(np.asarray(grad).transpose(0, 3, 1, 2), tp.grad.numpy(), atol=TOL, rtol=0)


def test_focal_gradient_loss_on_flat_target_is_finite():
    """Reference: 0/0 = NaN on a channel with no target gradient; ours: that channel contributes 0."""
    pred, target = _flows(3)
    target[0, 1] = 0.7  # image 0, channel v: constant
    tp, tt = torch.from_numpy(pred), torch.from_numpy(target)
    with torch.inference_mode():
        assert torch.isnan(_torch_focal_gradient(tt, tp, 0.1))
        # The reference value with the flat channel's terms replaced by 0 (mean still over all B·C terms).
        keep = torch.ones(3, 2)
        keep[0, 1] = 0

        def edge(x, y):
            w = 1.0 - torch.exp(-y / 0.1)
            w = w / w.sum((-1, -2), keepdim=True)
            return torch.nan_to_num((w * torch.abs(x - y)).sum((-1, -2))) * keep

        dx = lambda f: torch.abs(f[:, :, :, :-1] - f[:, :, :, 1:])  # noqa: E731
        dy = lambda f: torch.abs(f[:, :, :-1, :] - f[:, :, 1:, :])  # noqa: E731
        expected = (edge(dx(tp), dx(tt)).mean() + edge(dy(tp), dy(tt)).mean()).item()
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
