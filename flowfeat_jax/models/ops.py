"""Numerics of the FlowFeat models, one implementation per platform (issue 17 item 1).

Every speed decision here was measured on XLA:CPU (2 threads, AMD EPYC; README "Benchmark"), where XLA lowers some
ops far below matmul speed. Each such workaround is the `cpu` branch of `lax.platform_dependent`; every other platform
(GPUs, TPUs) gets the stock XLA / cuDNN path as its `default` branch. Both branches compute the same function (tests/
test_ops.py runs both on CPU through `force_path`), so a model file only says which op it needs:

  op                  cpu branch (measured on 2 CPU threads)                 default branch (GPU)
  attention           post-normalised softmax, queries in blocks of 256      jax.nn.dot_product_attention (cuDNN
                      (1.35x, then 2x past 256 rows)                         flash attention for bf16/f16, else XLA)
  same_conv           1×1 as one matmul; 3×3 weight gradient per tap from    lax.conv_general_dilated and XLA's own
                      2^22 output-gradient elements (1.0 s -> 72 ms; 2.8 s   weight/input gradients (cuDNN)
                      -> 0.65 s)
  patch_upsample      one matmul + depth-to-space (2.2 s -> 0.14 s fwd+bwd)  lax.conv_transpose (cuDNN)
  resample_axis       2-tap gathers forward and backward (180 -> 47 ms)      dense interpolation matmul (unmeasured on
                                                                             a GPU: the stock path, tensor cores)
  run_after           x + 0·d data dependency (+0.38 s per step without)     identity (no thread pool to starve)

`gelu` is the same on every platform (elementwise, fused by XLA everywhere).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

PATHS = ("cpu", "default")
_forced_path: str | None = None


@contextlib.contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Within the block, functions TRACED here take the `cpu` or the `default` branch whatever the platform (tests
    run the GPU path on CPU this way); None restores platform dispatch. Applies at trace time: jit a fresh function
    inside the block."""
    global _forced_path
    if path not in (*PATHS, None):
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def by_platform(*args, cpu: Callable, default: Callable):
    """cpu(*args) on XLA:CPU, default(*args) elsewhere (or the branch `force_path` chose)."""
    if _forced_path == "cpu":
        return cpu(*args)
    if _forced_path == "default":
        return default(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------

# XLA:CPU's batched matmuls run about 2x slower per row once the query axis passes 256 rows (ViT-S/14 at 224 has 257
# tokens), so on CPU queries go in blocks of 256: batch 8, 257 tokens, 27.6 -> 12.7 ms per layer; batch 2, 1025
# tokens, 63 -> 39 ms (2 threads).
CPU_QUERY_BLOCK = 256


def _post_normalised_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.matmul((q * scale).transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1),
                        preferred_element_type=jnp.float32)  # (B, N, Tq, T)
    weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    out = jnp.matmul(weights.astype(v.dtype), v.transpose(0, 2, 1, 3), preferred_element_type=jnp.float32)
    out = out / weights.sum(axis=-1, keepdims=True)
    return out.astype(v.dtype).transpose(0, 2, 1, 3)  # (B, Tq, N, D)


def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The softmax normalised after the value product (one (B, N, T, D) division instead of a (B, N, T, T) one), keys
    pre-transposed: 1.35x faster than jax.nn.dot_product_attention on CPU (ViT-S/14 at 224, batch 8: 14.4 vs 19.5 ms
    per layer, 2 threads); queries in blocks of `CPU_QUERY_BLOCK` rows."""
    length = q.shape[1]
    blocks = [_post_normalised_attention(q[:, i:i + CPU_QUERY_BLOCK], k, v) for i in range(0, length, CPU_QUERY_BLOCK)]
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def stock_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """jax.nn.dot_product_attention: cuDNN flash attention for 16-bit inputs where cuDNN takes the shape (it never
    builds the (B, N, T, T) score tensor), else XLA's implementation; the softmax is f32 in both."""
    if q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (RuntimeError, NotImplementedError, ValueError):  # no cuDNN here, or a shape it does not take
            pass
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q kᵀ / √D) v per head for (B, T, N, D) queries, keys and values; scores and softmax in f32."""
    return by_platform(q, k, v, cpu=cpu_attention, default=stock_attention)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU x·Φ(x) = ½x(1 + erf(x/√2)), the torch form, in f32 (1 + erf cancels for x ≪ 0 in bf16); XLA:CPU
    runs it faster than jax.nn.gelu's erfc form, and elsewhere it is one fused elementwise op either way."""
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1 + jax.lax.erf(x32 * (1 / math.sqrt(2))))).astype(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Convolutions. XLA:CPU lowers the weight gradient of a convolution to a convolution whose kernel is the output
# gradient (H×W wide), which runs far below matmul speed on large maps: at B·H·W = 4·224², 128 channels, 1.0 s for
# a 1×1 kernel vs 72 ms as one matmul; 3×3 at 4·224², 128 channels, 2.8 s vs 0.65 s as 9 tap matmuls; a ConvTranspose
# 4×4/4 at 4·16², 384 channels, 2.2 s for forward+backward vs 0.14 s as one matmul (2 threads). So on CPU 1×1
# convolutions and the patch upsampling are matmuls, and large 3×3 weight gradients are taken per tap.
# --------------------------------------------------------------------------------------------------------------------

# That convolution slows down once its kernel, the output gradient, outgrows the caches. Ratio of its time to
# `tap_weight_grad`'s (2 threads), by output-gradient elements B·H·W·Cout: below 2^22 0.5–1.03 (19 shapes, 64–384
# channels, sides 56–224); from 2^22 1.07–1.35, from 2^23 2.8–4.3 (4·224², 128 channels: 2.8 s vs 0.65 s). Taps from
# 2^22 on.
TAP_WEIGHT_GRAD_MIN_ELEMENTS = 2**22

_NHWC = ("NHWC", "HWIO", "NHWC")


def lax_same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The stock stride-1 convolution with torch padding k // 2 (also the default branch of `same_conv`)."""
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad)] * 2, dimension_numbers=_NHWC)


def tap_weight_grad(x: jax.Array, grad_out: jax.Array, kernel_size: int) -> jax.Array:
    """Weight gradient (k, k, Cin, Cout) of a stride-1 'same' convolution as k² matmuls (B·H·W, Cin)ᵀ @ (B·H·W, Cout),
    one per kernel tap, accumulated in f32. A loop, not k² unrolled matmuls: XLA then holds one shifted window at a
    time (198 MB of scratch instead of 884 MB at 4·224², 128 channels)."""
    batch, height, width, cin = x.shape
    pad = kernel_size // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1])

    def add_tap(tap, taps):
        window = jax.lax.dynamic_slice(padded, (0, tap // kernel_size, tap % kernel_size, 0),
                                       (batch, height, width, cin))
        product = jnp.matmul(window.reshape(-1, cin).T, grad_rows, preferred_element_type=jnp.float32)
        return taps.at[tap].set(product)

    taps = jnp.zeros((kernel_size * kernel_size, cin, grad_rows.shape[-1]), jnp.float32)
    taps = jax.lax.fori_loop(0, kernel_size * kernel_size, add_tap, taps)
    return taps.reshape(kernel_size, kernel_size, cin, -1).astype(x.dtype)


@jax.custom_vjp
def _cpu_spatial_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax_same_conv(x, kernel)


def _cpu_spatial_conv_fwd(x, kernel):
    return lax_same_conv(x, kernel), (x, kernel)


def _cpu_spatial_conv_bwd(residuals, grad_out):
    x, kernel = residuals
    grad_x = jax.vjp(lambda inputs: lax_same_conv(inputs, kernel), x)[1](grad_out)[0]
    if grad_out.size < TAP_WEIGHT_GRAD_MIN_ELEMENTS:
        grad_kernel = jax.vjp(lambda weights: lax_same_conv(x, weights), kernel)[1](grad_out)[0]
    else:
        grad_kernel = tap_weight_grad(x, grad_out, kernel.shape[0])
    return grad_x, grad_kernel


_cpu_spatial_conv.defvjp(_cpu_spatial_conv_fwd, _cpu_spatial_conv_bwd)


def cpu_same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1×1: one 2-D matmul (so its weight gradient is one too); larger kernels: lax convolutions whose weight gradient
    is `tap_weight_grad` from `TAP_WEIGHT_GRAD_MIN_ELEMENTS` output-gradient elements on."""
    if kernel.shape[0] == 1:
        rows = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[2:])
        return rows.reshape(*x.shape[:-1], kernel.shape[-1])
    return _cpu_spatial_conv(x, kernel)


def same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 convolution with torch padding k // 2 of x (B, H, W, Cin) by kernel (k, k, Cin, Cout), k odd."""
    return by_platform(x, kernel, cpu=cpu_same_conv, default=lax_same_conv)


def cpu_patch_upsample(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """out[b, f·i + u, f·j + v] = kernel[u, v] @ x[b, i, j]: one matmul, then a depth-to-space shuffle (XLA:CPU runs
    the transposed convolution as a zero-dilated one)."""
    batch, height, width, cin = x.shape
    factor, _, cout, _ = kernel.shape
    patches = x.reshape(-1, cin) @ kernel.reshape(-1, cin).T  # (B·h·w, f·f·Cout)
    patches = patches.reshape(batch, height, width, factor, factor, cout)
    return patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height * factor, width * factor, cout)


def lax_patch_upsample(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The stock transposed convolution, stride = kernel side, no padding (kernel in (f, f, Cout, Cin) as
    nnx.ConvTranspose(transpose_kernel=True))."""
    factor = kernel.shape[0]
    return jax.lax.conv_transpose(x, kernel, (factor, factor), "VALID", dimension_numbers=_NHWC, transpose_kernel=True)


def patch_upsample(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """torch ConvTranspose2d with kernel = stride = f, padding 0, on x (B, h, w, Cin) with kernel (f, f, Cout, Cin):
    every token becomes an f×f patch."""
    return by_platform(x, kernel, cpu=cpu_patch_upsample, default=lax_patch_upsample)


# --------------------------------------------------------------------------------------------------------------------
# Separable resampling by a banded (out, in) matrix along one axis (bilinear resizes of the DPT decoder).
# --------------------------------------------------------------------------------------------------------------------


def _matrix_taps(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (rows, t): the nonzero entries of every row of `matrix`, padded with weight 0."""
    nonzero = [np.flatnonzero(row) for row in matrix]
    taps = max(1, max(len(n) for n in nonzero))
    indices = np.zeros((len(matrix), taps), np.int32)
    weights = np.zeros((len(matrix), taps), np.float32)
    for row, columns in enumerate(nonzero):
        indices[row, : len(columns)] = columns
        weights[row, : len(columns)] = matrix[row, columns]
    return indices, weights


def _apply_taps(x: jax.Array, indices: np.ndarray, weights: np.ndarray, axis: int) -> jax.Array:
    """Σ_k weights[:, k] · take(x, indices[:, k], axis): a banded matrix applied along one axis by gathers; sums in
    f32 (as a matmul would accumulate), result in x's dtype."""
    shape = [1] * x.ndim
    shape[axis] = len(indices)
    out = None
    for k in range(indices.shape[1]):
        term = jnp.take(x, indices[:, k], axis=axis).astype(jnp.float32) * weights[:, k].reshape(shape)
        out = term if out is None else out + term
    return out.astype(x.dtype)


def cpu_resample_axis(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
    """Forward and backward both gather the few nonzero taps (of the matrix, then of its transpose): a dense einsum
    costs in·out multiply-adds per column (180 ms forward at 4·128²→224², 128 channels, on 2 CPU threads, vs 47 ms),
    and autodiff of a gather would scatter-add (slow on CPU)."""
    forward_taps, transpose_taps = _matrix_taps(matrix), _matrix_taps(matrix.T)

    @jax.custom_vjp
    def resample(x):
        return _apply_taps(x, *forward_taps, axis)

    def resample_fwd(x):
        return resample(x), None

    def resample_bwd(_, grad_out):
        return (_apply_taps(grad_out, *transpose_taps, axis),)

    resample.defvjp(resample_fwd, resample_bwd)
    return resample(x)


def matmul_resample_axis(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
    """The dense (out, in) matrix contracted with `axis` of x, accumulated in f32, result in x's dtype (the matrix is
    cast to x's dtype, as every other weight of the layer)."""
    weights = jnp.asarray(matrix, jnp.float32).astype(x.dtype)
    out = jnp.tensordot(x, weights, axes=((axis,), (1,)), preferred_element_type=jnp.float32)  # axis moved last
    return jnp.moveaxis(out, -1, axis).astype(x.dtype)


def resample_axis(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
    """`matrix` (out, in), a static banded resampling matrix, applied along `axis` of x."""
    return by_platform(x, cpu=lambda x: cpu_resample_axis(x, matrix, axis),
                       default=lambda x: matmul_resample_axis(x, matrix, axis))


# --------------------------------------------------------------------------------------------------------------------
# Ordering
# --------------------------------------------------------------------------------------------------------------------


def cpu_run_after(tree: PyTree, dependency: jax.Array) -> PyTree:
    """`tree` unchanged (x + 0·d), but computed only once `dependency` is: a data dependency that XLA keeps (it does
    not fold float multiplies by zero), where jax.lax.optimization_barrier does not order XLA:CPU's concurrent thunk
    executor. Leaves and `dependency` share the leading (batch) axis and each example depends only on its own row,
    so nothing crosses devices under batch sharding; a non-finite row makes that example non-finite (the step's guard
    then discards the step, as it would for the non-finite prediction anyway)."""
    zero = 0 * dependency.reshape(dependency.shape[0], -1)[:, 0]
    return jax.tree.map(lambda x: x + zero.reshape(-1, *(1,) * (x.ndim - 1)).astype(x.dtype), tree)


def run_after(tree: PyTree, dependency: jax.Array) -> PyTree:
    """`tree`, computed after `dependency` on CPU. Left independent, XLA:CPU runs the ridge solve's LAPACK call beside
    the student's convolutions; the call then waits on the busy thread pool while holding one of its threads, and the
    convolutions run on the rest (+0.38 s per step at ViT-S/14, batch 4, on 2 threads). GPUs have no such pool."""
    return by_platform(tree, dependency, cpu=cpu_run_after, default=lambda tree, _: tree)
