"""PAMR refinement (dense 11 x 11 kernel of FlowFeat++ and dilated rings): sharpening on a two-region image, a
per-pixel numpy transcription of the formula, bad inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from flowfeat_jax.probes import pamr


def _two_regions(height=32, width=48, boundary=20, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.zeros((height, width), bool)
    truth[:, :boundary] = True
    features = np.where(truth[..., None], [1.0, 0.0, 0.5], [0.0, 1.0, -0.5]) + 0.01 * rng.standard_normal(
        (height, width, 3))
    return truth, features.astype(np.float32)


def _blurred_shifted_mask(truth, blur=13, shift=4):
    """A coarse prediction: the true mask box-blurred and pushed `shift` pixels across the boundary."""
    soft = truth.astype(np.float64)
    kernel = np.ones(blur) / blur
    soft = np.apply_along_axis(lambda r: np.convolve(np.pad(r, blur // 2, mode="edge"), kernel, "valid"), 1, soft)
    soft = np.roll(soft, shift, axis=1)
    soft[:, :shift] = 1.0
    return np.stack([soft, 1 - soft], -1)[None].astype(np.float32)


def _iou(masks, truth):
    pred = masks[..., 0] > masks[..., 1]
    return (pred & truth).sum() / (pred | truth).sum()


@pytest.mark.parametrize("kernel, dilations", [("dense", ()), ("rings", pamr.FLOWFEAT_DILATIONS),
                                               ("rings", pamr.PAMR_DILATIONS)])
def test_pamr_sharpens_blurred_mask_on_two_flat_regions(kernel, dilations):
    truth, features = _two_regions()
    masks = _blurred_shifted_mask(truth)
    before = _iou(masks[0], truth)
    refined = np.asarray(pamr.pamr(jnp.asarray(features[None]), jnp.asarray(masks), kernel=kernel,
                                   dilations=dilations, num_iter=10))
    after = _iou(refined[0], truth)
    assert before == pytest.approx(0.8333, abs=1e-3)  # 4 of 24 columns of the region are wrong
    assert after == 1.0 and after - before > 0.15
    np.testing.assert_allclose(refined.sum(-1), 1.0, atol=1e-5)  # convex combinations keep probabilities


def test_no_refinement_without_iterations_and_constant_masks_stay():
    truth, features = _two_regions(12, 12, 5)
    masks = _blurred_shifted_mask(truth, blur=3, shift=1)
    same = pamr.pamr(jnp.asarray(features[None]), jnp.asarray(masks), num_iter=0)
    np.testing.assert_array_equal(np.asarray(same), masks)
    constant = np.full_like(masks, 0.25)
    out = pamr.pamr(jnp.asarray(features[None]), jnp.asarray(constant), num_iter=3)
    np.testing.assert_allclose(np.asarray(out), 0.25, atol=1e-6)


def _reference_pamr(features, masks, kernels, num_iter):
    """Per-pixel loops over the formula of Araslanov & Roth 2020 (replicate borders, unbiased local std); `kernels`
    lists each kernel's taps, centre included (PAMR: one dilated 3 x 3 per dilation; FlowFeat++: one dense one)."""
    height, width, channels = features.shape
    offsets = [o for kernel in kernels for o in kernel]

    def at(array, y, x):
        return array[min(max(y, 0), height - 1), min(max(x, 0), width - 1)]

    alpha = np.zeros((height, width, len(offsets) - len(kernels)))
    for y in range(height):
        for x in range(width):
            taps = np.stack([at(features, y + dy, x + dx) for dy, dx in offsets])  # (9D, K), centre once per d
            std = taps.std(axis=0, ddof=1)
            ring = [o for o in offsets if o != (0, 0)]
            logits = [-np.mean(np.abs(features[y, x] - at(features, y + dy, x + dx)) / (1e-8 + 0.1 * std))
                      for dy, dx in ring]
            e = np.exp(np.asarray(logits) - np.max(logits))
            alpha[y, x] = e / e.sum()
    ring = [o for o in offsets if o != (0, 0)]
    for _ in range(num_iter):
        new = np.zeros_like(masks)
        for y in range(height):
            for x in range(width):
                new[y, x] = sum(alpha[y, x, p] * at(masks, y + dy, x + dx) for p, (dy, dx) in enumerate(ring))
        masks = new
    return masks


def _rings(dilations):
    return [[(dy * d, dx * d) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] for d in dilations]


def _dense(size):
    r = size // 2
    return [[(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]]


@pytest.mark.parametrize("kwargs, kernels, shape", [
    (dict(kernel="rings", dilations=(1, 2)), _rings((1, 2)), (6, 7)),
    (dict(kernel="dense", size=5), _dense(5), (6, 7)),
    (dict(kernel="dense"), _dense(11), (9, 12)),  # the FlowFeat++ default, wider than the image: borders replicate
])
def test_pamr_matches_per_pixel_formula(kwargs, kernels, shape):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((*shape, 4)).astype(np.float32)
    masks = rng.random((*shape, 3)).astype(np.float32)
    expected = _reference_pamr(features.astype(np.float64), masks.astype(np.float64), kernels, 2)
    got = pamr.pamr(jnp.asarray(features[None]), jnp.asarray(masks[None]), num_iter=2, **kwargs)
    np.testing.assert_allclose(np.asarray(got)[0], expected, atol=1e-5)


def test_offsets_span_eleven_by_eleven():
    dense, kernels = pamr.kernel_offsets("dense")  # the default: one dense 11 x 11 kernel
    assert kernels == 1 and len(dense) == 120 and len(set(dense)) == 120 and (0, 0) not in dense
    assert np.min(dense) == -5 and np.max(dense) == 5
    offsets = np.asarray(pamr.ring_offsets(pamr.FLOWFEAT_DILATIONS))
    assert len(offsets) == 40 and len({tuple(o) for o in offsets}) == 40
    assert offsets.min() == -5 and offsets.max() == 5  # 11 x 11 window
    assert set(map(tuple, offsets)) < set(dense)
    with pytest.raises(ValueError, match="dilations"):
        pamr.ring_offsets((1, 0))
    with pytest.raises(ValueError, match="odd integer"):
        pamr.dense_offsets(10)
    with pytest.raises(ValueError, match="kernel must be one of"):
        pamr.kernel_offsets("disk")
    with pytest.raises(ValueError, match="pamr expects"):
        pamr.pamr(jnp.zeros((1, 4, 4, 2)), jnp.zeros((4, 4, 2)))


def test_masks_at_lower_resolution_are_upsampled():
    truth, features = _two_regions(16, 16, 8)
    low = np.zeros((1, 4, 4, 2), np.float32)
    low[:, :, :2, 0], low[:, :, 2:, 1] = 1, 1
    out = pamr.pamr(jnp.asarray(features[None]), jnp.asarray(low), num_iter=5)
    assert out.shape == (1, 16, 16, 2) and _iou(np.asarray(out)[0], truth) == 1.0
