"""Ridge solve/predict vs the torch reference (torch_ref/train.py, model.py FlowFeatTrain.forward_flow) and vs numpy
float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowfeat_jax.torch_ref import train as torch_ref
from flowfeat_jax.train import ridge

TOL = 1e-4


def _inputs(seed, b=3, d=6, h=8, w=10, c=2):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    teacher = (rng.normal(size=(b, h, w, d)) @ mixing + 0.5).astype(np.float32)  # correlated, non-centred
    student = (teacher + 0.2 * rng.normal(size=teacher.shape)).astype(np.float32)
    flow = (teacher[..., :c] * 0.7 - 0.3 + 0.1 * rng.normal(size=(b, h, w, c))).astype(np.float32)
    return teacher, student, flow


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("alpha", [0.1, 1e-3, 1.0])
def test_ridge_matches_torch_forward_flow(alpha):
    teacher, student, flow = _inputs(0)
    with torch.inference_mode():
        ref_weights = torch_ref.ridge_solve(_nchw(flow), _nchw(teacher), alpha)
        ref_pred = torch_ref.ridge_predict(_nchw(student), ref_weights)
    weights = ridge.ridge_solve(jnp.asarray(teacher), jnp.asarray(flow), alpha)
    pred = ridge.ridge_predict(jnp.asarray(student), weights)
    assert weights.shape == (3, 7, 2) and weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(weights), ref_weights.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(pred).transpose(0, 3, 1, 2), ref_pred.numpy(), atol=TOL, rtol=0)


def test_ridge_matches_numpy_augmented_least_squares():
    """Independent float64 route: min ||X̃A − U||²/N + α||A||² as lstsq of [X̃/√N; √α I] A = [U/√N; 0]."""
    alpha = 0.1
    teacher, _, flow = _inputs(1, b=2, d=5, h=6, w=7, c=3)
    weights = np.asarray(ridge.ridge_solve(jnp.asarray(teacher), jnp.asarray(flow), alpha))
    for i in range(2):
        x = np.concatenate([teacher[i].reshape(-1, 5), np.ones((42, 1))], axis=1).astype(np.float64)
        u = flow[i].reshape(-1, 3).astype(np.float64)
        design = np.concatenate([x / np.sqrt(42), np.sqrt(alpha) * np.eye(6)])
        target = np.concatenate([u / np.sqrt(42), np.zeros((6, 3))])
        expected = np.linalg.lstsq(design, target, rcond=None)[0]
        np.testing.assert_allclose(weights[i], expected, atol=TOL, rtol=0)


def test_ridge_bias_is_regularised_and_bf16_inputs_solve_in_f32():
    # Constant features and flow: only the bias can fit; with α on the bias entry too the fit shrinks.
    features, flow = jnp.zeros((1, 4, 4, 3)), jnp.full((1, 4, 4, 1), 2.0)
    weights = ridge.ridge_solve(features, flow, alpha=1.0)
    np.testing.assert_allclose(np.asarray(weights)[0, :, 0], [0, 0, 0, 1.0], atol=1e-6)  # (1 + α)·b = 2
    teacher, student, flow = _inputs(2)
    as_bf16 = jnp.asarray(teacher).astype(jnp.bfloat16)
    weights = ridge.ridge_solve(as_bf16, jnp.asarray(flow), 0.1)
    expected = ridge.ridge_solve(as_bf16.astype(jnp.float32), jnp.asarray(flow), 0.1)
    assert weights.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(weights), np.asarray(expected))
    assert ridge.ridge_predict(jnp.asarray(student).astype(jnp.bfloat16), weights).dtype == jnp.float32


def test_ridge_predict_gradient_matches_torch_autograd():
    """The loss gradient flows through the student features (ridge weights from the EMA teacher are constant)."""
    teacher, student, flow = _inputs(3)
    tstudent = _nchw(student).requires_grad_(True)
    ref_pred = torch_ref.ridge_flow(_nchw(flow), _nchw(teacher), tstudent, 0.1)
    probe = np.random.default_rng(4).normal(size=ref_pred.shape).astype(np.float32)
    (ref_pred * torch.from_numpy(probe)).sum().backward()

    weights = jax.lax.stop_gradient(ridge.ridge_solve(jnp.asarray(teacher), jnp.asarray(flow), 0.1))

    def objective(features):
        return jnp.sum(ridge.ridge_predict(features, weights) * jnp.asarray(probe.transpose(0, 2, 3, 1)))

    grad = jax.jit(jax.grad(objective))(jnp.asarray(student))
    np.testing.assert_allclose(np.asarray(grad).transpose(0, 3, 1, 2), tstudent.grad.numpy(), atol=TOL, rtol=0)
    jitted = jax.jit(ridge.ridge_solve)(jnp.asarray(teacher), jnp.asarray(flow), 0.1)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(weights), atol=TOL, rtol=0)


def test_ridge_rejects_bad_shapes():
    with pytest.raises(ValueError, match="share"):
        ridge.ridge_solve(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5, 2)), 0.1)
    with pytest.raises(ValueError, match="d\\+1"):
        ridge.ridge_predict(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 3, 2)))
