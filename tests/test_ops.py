"""Both branches of every op in models/ops.py (the XLA:CPU workaround and the stock path GPUs take) compute the same
function, values and gradients; the stock path is forced on CPU with `ops.force_path`, and a lowering for CUDA
(no GPU needed) shows that GPUs get it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowfeat_jax.models import dpt, ops

PATHS = ("cpu", "default")


def _normal(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _value_and_grads(path, fn, *args):
    """fn(*args) and the gradient of ⟨fn(*args), c⟩ for a fixed random cotangent c, traced under `path`."""
    cotangent = _normal(99, *jax.eval_shape(fn, *args).shape)

    def value_and_pairing(*a):
        out = fn(*a)
        return jnp.vdot(out, cotangent), out

    with ops.force_path(path):
        pairing = jax.value_and_grad(value_and_pairing, argnums=tuple(range(len(args))), has_aux=True)
        (_, out), grads = jax.jit(pairing)(*args)
    return np.asarray(out), jax.tree.map(np.asarray, grads)


def _assert_paths_agree(fn, *args, atol=1e-4):
    (cpu_out, cpu_grads), (default_out, default_grads) = (_value_and_grads(p, fn, *args) for p in PATHS)
    np.testing.assert_allclose(cpu_out, default_out, atol=atol, rtol=0)
    for cpu_grad, default_grad in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(default_grads), strict=True):
        np.testing.assert_allclose(cpu_grad, default_grad, atol=atol * max(1.0, np.abs(cpu_grad).max()), rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("length", [5, 256, 300])  # one query block, exactly one, a 256 + 44 split (cpu path)
def test_attention_matches_softmax_reference(path, length):
    rng = np.random.default_rng(length)
    q, k, v = (rng.standard_normal((2, length, 3, 8)).astype(np.float32) for _ in range(3))
    scores = np.einsum("bqnd,bknd->bnqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(8)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bnqk,bknd->bqnd", weights, v.astype(np.float64))
    with ops.force_path(path):
        got = np.asarray(jax.jit(ops.attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_attention_paths_agree_with_gradients_and_in_bf16():
    q, k, v = (_normal(i, 2, 300, 2, 8) for i in range(3))
    _assert_paths_agree(ops.attention, q, k, v, atol=1e-5)
    with ops.force_path("cpu"):
        cpu = jax.jit(ops.attention)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    with ops.force_path("default"):
        default = jax.jit(ops.attention)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert cpu.dtype == default.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(cpu, np.float32), np.asarray(default, np.float32), atol=2e-2, rtol=0)


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("tap_threshold", [0, 2**62])  # per-tap weight gradient on CPU / XLA's own
@pytest.mark.slow
def test_same_conv_paths_agree(monkeypatch, kernel_size, tap_threshold):
    monkeypatch.setattr(ops, "TAP_WEIGHT_GRAD_MIN_ELEMENTS", tap_threshold)
    _assert_paths_agree(ops.same_conv, _normal(1, 2, 9, 7, 5), _normal(2, kernel_size, kernel_size, 5, 6))


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.slow
def test_patch_upsample_paths_agree(factor):
    x, kernel = _normal(3, 2, 3, 5, 6), _normal(4, factor, factor, 4, 6)
    _assert_paths_agree(ops.patch_upsample, x, kernel)
    # Each token becomes its own patch: output pixel (f·i + u, f·j + v) is kernel[u, v] @ x[i, j].
    with ops.force_path("default"):
        out = np.asarray(jax.jit(ops.patch_upsample)(x, kernel))
    np.testing.assert_allclose(out[1, factor * 2 + 1, factor * 4 + 0], np.asarray(kernel[1, 0] @ x[1, 2, 4]),
                               atol=1e-5)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.slow
def test_resample_axis_paths_match_the_dense_matrix(align_corners, dtype):
    matrix = dpt._interpolation_matrix(7, 12, align_corners)
    x = _normal(5, 2, 7, 3, 4)
    expected = np.einsum("oi,bihc->bohc", matrix.astype(np.float64), np.asarray(x, np.float64))
    for path in PATHS:
        with ops.force_path(path):
            got = jax.jit(lambda x: ops.resample_axis(x, matrix, axis=1))(x.astype(dtype))
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=1e-5 if dtype == jnp.float32 else 5e-2)
    _assert_paths_agree(lambda x: ops.resample_axis(x, matrix, axis=2), _normal(6, 2, 3, 7, 4))


def test_run_after_default_path_is_the_identity():
    tree = {"a": jnp.arange(6.0).reshape(2, 3)}
    with ops.force_path("default"):
        same = jax.jit(ops.run_after)(tree, jnp.array([[jnp.nan], [1.0]]))
    np.testing.assert_array_equal(np.asarray(same["a"]), np.asarray(tree["a"]))  # no NaN: no dependency needed


def test_cuda_lowering_takes_the_stock_paths():
    """Lowered for CUDA (StableHLO only, no GPU needed), a 3×3 weight gradient is XLA's convolution, not the per-tap
    loop, the patch upsampling a transposed convolution, and the resize a matmul, not gathers."""
    def lowered(fn, *args, platform):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()

    x, kernel = jnp.ones((4, 224, 224, 128)), jnp.ones((3, 3, 128, 128))
    weight_grad = jax.grad(lambda x, k: ops.same_conv(x, k).sum(), argnums=1)
    assert "while" in lowered(weight_grad, x, kernel, platform="cpu")
    cuda = lowered(weight_grad, x, kernel, platform="cuda")
    assert "while" not in cuda and "convolution" in cuda
    upsample = lowered(ops.patch_upsample, jnp.ones((2, 4, 4, 8)), jnp.ones((4, 4, 8, 8)), platform="cuda")
    assert "convolution" in upsample
    matrix = dpt._interpolation_matrix(16, 32, True)
    resize = lowered(lambda x: ops.resample_axis(x, matrix, axis=1), jnp.ones((2, 16, 16, 8)), platform="cuda")
    assert "gather" not in resize and "dot_general" in resize
    assert "gather" in lowered(lambda x: ops.resample_axis(x, matrix, axis=1), jnp.ones((2, 16, 16, 8)),
                               platform="cpu")
