"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020, Sec. 3.2), driven by FlowFeat features.

FlowFeat++ in the FlowFeat paper refines the probe's class probabilities with PAMR, using the FlowFeat features
instead of RGB for the affinities: ONE 11 x 11 kernel, a fixed scaling factor 0.1 and 10 steps (recipe.md).

PAMR (visinf/1-stage-wseg models/mods/pamr.py) works on a set of kernels; kernel k is a set of neighbour offsets
around pixel i, read with replicate padding at the border. With features x (K channels) and the union of the
kernels' P neighbours j:

    sigma_i,k   = unbiased std of x_k over the taps of all kernels around i (each kernel's offsets plus the centre,
                  the centre counted once per kernel)
    a_ij        = mean_k  -|x_i,k - x_j,k| / (1e-8 + scale * sigma_i,k)            scale = 0.1 (fixed, PAMR's)
    alpha_ij    = softmax_j(a_ij)
    m_i <- sum_j alpha_ij * m_j        repeated `num_iter` times (the pixel itself is not among the j).

Kernels. The FlowFeat paper's one dense 11 x 11 kernel (`dense_offsets(11)`, the default): all 120 pixels of the
window around i, 121 taps for sigma. PAMR's own kernels are 3 x 3 rings dilated by each of (1, 2, 4, 8, 12, 24)
(`ring_offsets(PAMR_DILATIONS)`); rings dilated by (1, 2, 3, 4, 5) span the same 11 x 11 window with 40 of its
pixels (`FLOWFEAT_DILATIONS`, this project's earlier reading of "11 x 11"), one config value away
(`pamr.kernel='rings'`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

FLOWFEAT_DILATIONS = (1, 2, 3, 4, 5)  # rings spanning 11 x 11
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)  # Araslanov & Roth 2020
KERNELS = ("dense", "rings")
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))

Offsets = tuple[tuple[int, int], ...]


def ring_offsets(dilations: Sequence[int]) -> Offsets:
    """(dy, dx) of the P = 8 * len(dilations) neighbours: the dilated 3 x 3 ring of each dilation."""
    if not dilations or any(int(d) < 1 for d in dilations):
        raise ValueError(f"PAMR dilations must be positive integers, got {tuple(dilations)}")
    return tuple((dy * int(d), dx * int(d)) for d in dilations for dy, dx in _RING)


def dense_offsets(size: int) -> Offsets:
    """(dy, dx) of the size^2 - 1 neighbours of one dense size x size kernel (size odd)."""
    if size < 3 or size % 2 == 0:
        raise ValueError(f"PAMR kernel size must be an odd integer >= 3, got {size}")
    r = size // 2
    return tuple((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0))


def kernel_offsets(kernel: str, size: int = 11, dilations: Sequence[int] = FLOWFEAT_DILATIONS) -> tuple[Offsets, int]:
    """(neighbour offsets, number of kernels) of `kernel`: 'dense' (one size x size kernel) or 'rings'."""
    if kernel == "dense":
        return dense_offsets(size), 1
    if kernel == "rings":
        return ring_offsets(dilations), len(dilations)
    raise ValueError(f"PAMR kernel must be one of {KERNELS}, got {kernel!r}")


def _shift(padded: jax.Array, offset: tuple[int, int], pad: int, hw: tuple[int, int]) -> jax.Array:
    """x[i + offset] for every pixel i, from x (B, H, W, C) padded by `pad` with edge replication."""
    dy, dx = offset
    return padded[:, pad + dy : pad + dy + hw[0], pad + dx : pad + dx + hw[1]]


def _pairwise_sum(terms: list[jax.Array]) -> jax.Array:
    """Sum as a balanced tree: f32 rounding grows with log2(P) instead of P (P = 120 terms for 11 x 11)."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def local_affinities(features: jax.Array, offsets: Offsets, num_kernels: int, scale: float = 0.1) -> jax.Array:
    """alpha (B, H, W, P): softmax over the P neighbours of the feature affinities (see module docstring)."""
    x = features.astype(jnp.float32)
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    hw = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    # Kernel taps for the std: the neighbours plus the centre once per kernel.
    num_taps = len(offsets) + num_kernels
    mean = (_pairwise_sum([_shift(padded, o, pad, hw) for o in offsets]) + num_kernels * x) / num_taps
    squares = _pairwise_sum([jnp.square(_shift(padded, o, pad, hw) - mean) for o in offsets])
    squares = squares + num_kernels * jnp.square(x - mean)
    std = jnp.sqrt(squares / (num_taps - 1))  # torch.std default: unbiased
    inv_scale = 1.0 / (1e-8 + scale * std)
    logits = jnp.stack([-jnp.mean(jnp.abs(x - _shift(padded, o, pad, hw)) * inv_scale, axis=-1) for o in offsets], -1)
    return jax.nn.softmax(logits, axis=-1)


def pamr(
    features: jax.Array,
    masks: jax.Array,
    *,
    kernel: str = "dense",
    size: int = 11,
    dilations: Sequence[int] = FLOWFEAT_DILATIONS,
    num_iter: int = 10,
    scale: float = 0.1,
) -> jax.Array:
    """Refine masks (B, H, W, C) (e.g. class probabilities) with affinities of features (B, H, W, K).

    `kernel` 'dense' uses one `size` x `size` kernel (FlowFeat++), 'rings' the dilated 3 x 3 rings of `dilations`.
    Masks at another resolution are first resized bilinearly to the feature size (PAMR interpolates the mask to the
    image size). Returns (B, H, W, C) float32; convex combinations, so probabilities stay probabilities.
    """
    if features.ndim != 4 or masks.ndim != 4 or features.shape[0] != masks.shape[0]:
        raise ValueError(f"pamr expects features (B, H, W, K) and masks (B, h, w, C), got {features.shape}, "
                         f"{masks.shape}")
    offsets, num_kernels = kernel_offsets(kernel, size, dilations)
    batch, height, width, _ = features.shape
    masks = masks.astype(jnp.float32)
    if masks.shape[1:3] != (height, width):
        masks = jax.image.resize(masks, (batch, height, width, masks.shape[-1]), method="linear", antialias=False)
    alpha = local_affinities(features, offsets, num_kernels, scale)
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)

    def propagate(_, m):
        padded = jnp.pad(m, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        return _pairwise_sum([alpha[..., p, None] * _shift(padded, o, pad, (height, width)) for p, o in
                              enumerate(offsets)])

    return jax.lax.fori_loop(0, num_iter, propagate, masks)
