"""Affine crops vs torch F.affine_grid / F.grid_sample and a transcription of dataloader.py MaskRandScaleCrop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowfeat_jax.train import crops

TOL = 1e-4


def _torch_theta(top, left, box_h, box_w, scale, height, width, alpha_deg=0.0, flip=1.0):
    """Transcription of MaskRandScaleCrop.__call__ → get_affine → get_affine_inv for a given box (torch, f32)."""
    dy = top + box_h / 2 - height / 2
    dx = left + box_w / 2 - width / 2
    inv_scale = 1 / scale
    aspect = height / width
    sin, cos = math.sin(alpha_deg * math.pi / 180.0), math.cos(alpha_deg * math.pi / 180.0)
    fwd = torch.zeros(2, 3)
    fwd[0, 0], fwd[0, 1] = flip * cos, sin * aspect
    fwd[1, 0], fwd[1, 1] = -sin / aspect, cos
    fwd[0, 2] = -(cos * dx + sin * dy)
    fwd[1, 2] = -(-sin * dx + cos * dy)
    fwd[0, 2] /= width // 2
    fwd[1, 2] /= height // 2
    fwd *= inv_scale
    inv = fwd.clone()
    inv[0, 1] = fwd[1, 0] * aspect**2
    inv[1, 0] = fwd[0, 1] / aspect**2
    inv[0, 2] = -(inv[0, 0] * fwd[0, 2] + inv[0, 1] * fwd[1, 2])
    inv[1, 2] = -(inv[1, 0] * fwd[0, 2] + inv[1, 1] * fwd[1, 2])
    inv /= torch.tensor([inv_scale], dtype=torch.float32).view(1, 1) ** 2
    return inv


def _random_thetas(rng, batch):
    """Rotations, anisotropic scales above 1 and shifts beyond the image: exercises zero padding."""
    return rng.uniform(-1.6, 1.6, size=(batch, 2, 3)).astype(np.float32)


@pytest.mark.parametrize("out_hw", [(5, 7), (6, 6), (1, 3)])
def test_affine_grid_matches_torch(out_hw):
    theta = _random_thetas(np.random.default_rng(0), 3)
    ours = np.asarray(crops.affine_grid(jnp.asarray(theta), out_hw))
    with torch.inference_mode():
        ref = F.affine_grid(torch.from_numpy(theta), (3, 1, *out_hw), align_corners=False).numpy()
    assert ours.shape == ref.shape == (3, *out_hw, 2)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("in_hw,out_hw", [((9, 11), (5, 7)), ((8, 8), (12, 10)), ((16, 12), (4, 4))])
def test_grid_sample_matches_torch(in_hw, out_hw):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 4, *in_hw)).astype(np.float32)  # B C H W for torch
    theta = _random_thetas(rng, 3)
    with torch.inference_mode():
        grid = F.affine_grid(torch.from_numpy(theta), (3, 1, *out_hw), align_corners=False)
        ref = F.grid_sample(torch.from_numpy(images), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ours = crops.grid_sample_bilinear(jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(grid.numpy()))
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    assert (ref.numpy() == 0).any(), "test must reach the zero padding"
    np.testing.assert_allclose(ours, ref.numpy(), atol=TOL, rtol=0)


def test_grid_sample_far_outside_and_exact_pixel_centres():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    # Pixel centres reproduce the image; far-away points (incl. huge values) give zeros.
    ys, xs = (2 * np.arange(5) + 1) / 5 - 1, (2 * np.arange(6) + 1) / 6 - 1
    centres = np.stack(np.meshgrid(xs, ys), axis=-1)[None].repeat(2, 0).astype(np.float32)
    np.testing.assert_allclose(crops.grid_sample_bilinear(jnp.asarray(images), jnp.asarray(centres)), images, atol=1e-6)
    far = np.array([[[[3.0, 0.0], [0.0, -3.0], [1e12, -1e12], [-1.0 - 1 / 6 - 1e-3, 0.0]]]], np.float32).repeat(2, 0)
    assert np.all(np.asarray(crops.grid_sample_bilinear(jnp.asarray(images), jnp.asarray(far))) == 0)


def test_grid_sample_integer_images_and_bad_shapes():
    images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    grid = np.zeros((2, 1, 1, 2), np.float32)  # the image centre: mean of the 4 central pixels
    out = crops.grid_sample_bilinear(jnp.asarray(images), jnp.asarray(grid))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out)[:, 0, 0, 0], images[:, 1:3, 1:3, 0].reshape(2, -1).mean(1))
    with pytest.raises(ValueError, match="grid"):
        crops.grid_sample_bilinear(jnp.asarray(images), jnp.zeros((3, 1, 1, 2)))
    with pytest.raises(ValueError, match="theta"):
        crops.affine_grid(jnp.zeros((2, 3)), (4, 4))


@pytest.mark.slow
def test_affine_crop_matches_torch_crop_view():
    """model.py crop_view: one grid for the 448-like frame and the 224-like flow (here 16 and 8)."""
    theta = np.array(crops.sample_crop_params(jax.random.key(3), 4, image_size=16))
    rng = np.random.default_rng(3)
    frame, flow = rng.normal(size=(4, 3, 16, 16)).astype(np.float32), rng.normal(size=(4, 2, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        grid = F.affine_grid(torch.from_numpy(theta), (4, 1, 8, 8), align_corners=False)
        ref_frame = F.grid_sample(torch.from_numpy(frame), grid, align_corners=False).numpy()
        ref_flow = F.grid_sample(torch.from_numpy(flow), grid, align_corners=False).numpy()
    for src, ref in ((frame, ref_frame), (flow, ref_flow)):
        ours = np.asarray(crops.affine_crop(jnp.asarray(src.transpose(0, 2, 3, 1)), jnp.asarray(theta), (8, 8)))
        np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, atol=TOL, rtol=0)


@pytest.mark.slow
def test_affine_crop_at_training_size_matches_torch():
    """448² frame → 224² crop with the released sampler. A smooth frame: on white noise, f32 rounding of the sample
    position alone (1 ulp of the 448-pixel coordinate times neighbour differences of ~5) reaches ~2e-4, for torch f32
    vs float64 as much as for us."""
    theta = np.array(crops.sample_crop_params(jax.random.key(4), 2))
    rows, cols = np.mgrid[0:448, 0:448] / 448.0
    frame = np.stack([np.sin(6 * cols + c) + np.cos(9 * rows - 2 * c) + c * rows * cols for c in range(3)])
    frame = frame[None].repeat(2, 0).astype(np.float32)
    with torch.inference_mode():
        grid = F.affine_grid(torch.from_numpy(theta), (2, 1, 224, 224), align_corners=False)
        ref = F.grid_sample(torch.from_numpy(frame), grid, align_corners=False).numpy()
    ours = crops.affine_crop(jnp.asarray(frame.transpose(0, 2, 3, 1)), jnp.asarray(theta), (224, 224))
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "box,image_hw,alpha,flip",
    [
        ((0, 0, 224, 224, 0.5), (448, 448), 0.0, False),
        ((224, 224, 224, 224, 0.5), (448, 448), 0.0, False),
        ((17, 101, 335, 335, 0.7481), (448, 448), 0.0, False),
        ((3, 40, 150, 200, 0.5), (300, 400), 0.0, False),
        ((5, 9, 20, 20, 0.62), (33, 33), 0.0, False),  # odd side: the reference divides by W//2
        ((17, 101, 335, 335, 0.7481), (448, 448), 30.0, False),
        ((3, 40, 150, 200, 0.5), (300, 400), -20.0, False),
        ((17, 101, 335, 335, 0.7481), (448, 448), 0.0, True),
        ((3, 40, 150, 200, 0.5), (300, 400), 25.0, True),  # the reference's approximate inverse, kept as is
    ],
)
def test_crop_theta_matches_reference_transcription(box, image_hw, alpha, flip):
    top, left, box_h, box_w, scale = box
    ours = crops.crop_theta(
        jnp.array([top]), jnp.array([left]), jnp.array([box_h]), jnp.array([box_w]), jnp.array([scale]), image_hw,
        rotation_deg=alpha, flip=flip,
    )
    ref = _torch_theta(top, left, box_h, box_w, scale, *image_hw, alpha, -1.0 if flip else 1.0)
    np.testing.assert_allclose(np.asarray(ours)[0], ref.numpy(), atol=1e-6, rtol=0)


def test_released_theta_is_scale_and_shift():
    theta = crops.crop_theta(jnp.array([10]), jnp.array([30]), jnp.array([300]), jnp.array([300]), jnp.array([0.67]))
    dx, dy = 30 + 150 - 224, 10 + 150 - 224
    np.testing.assert_allclose(np.asarray(theta)[0], [[0.67, 0, dx / 224], [0, 0.67, dy / 224]], atol=1e-7)


@pytest.mark.parametrize("image_size", [448, (300, 400)])
def test_sampled_crops_follow_reference_distribution(image_size):
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    n = 20000
    theta = np.asarray(crops.sample_crop_params(jax.random.key(7), n, (0.5, 0.75), image_size=image_size))
    assert theta.shape == (n, 2, 3) and theta.dtype == np.float32
    scale = theta[:, 0, 0]
    np.testing.assert_array_equal(theta[:, 1, 1], scale)
    assert np.all(theta[:, 0, 1] == 0) and np.all(theta[:, 1, 0] == 0)
    assert scale.min() >= 0.5 and scale.max() < 0.75
    assert abs(scale.mean() - 0.625) < 0.003 and abs(scale.std() - 0.25 / math.sqrt(12)) < 0.003
    np.testing.assert_allclose(np.histogram(scale, bins=5, range=(0.5, 0.75))[0] / n, 0.2, atol=0.015)
    # Recover the integer box from the shift: left = tx·(W//2) − box_w/2 + W/2.
    box_h, box_w = np.floor(scale * height), np.floor(scale * width)
    top = theta[:, 1, 2] * (height // 2) - box_h / 2 + height / 2
    left = theta[:, 0, 2] * (width // 2) - box_w / 2 + width / 2
    np.testing.assert_allclose(top, np.round(top), atol=2e-3)
    np.testing.assert_allclose(left, np.round(left), atol=2e-3)
    top, left = np.round(top), np.round(left)
    assert top.min() == 0 and left.min() == 0
    assert np.all(top + box_h <= height) and np.all(left + box_w <= width)
    assert np.any(top + box_h == height) and np.any(left + box_w == width)
    # Positions are uniform over the free range, independently in the two axes.
    top_frac, left_frac = top / (height - box_h), left / (width - box_w)
    assert abs(top_frac.mean() - 0.5) < 0.01 and abs(left_frac.mean() - 0.5) < 0.01
    assert abs(np.corrcoef(top_frac, left_frac)[0, 1]) < 0.03
    # Different keys give different crops; the same key gives the same crops.
    again = crops.sample_crop_params(jax.random.key(7), n, (0.5, 0.75), image_size=image_size)
    np.testing.assert_array_equal(np.asarray(again), theta)
    assert not np.allclose(np.asarray(crops.sample_crop_params(jax.random.key(8), 4, image_size=image_size)), theta[:4])


def test_sample_crop_params_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale_range"):
        crops.sample_crop_params(jax.random.key(0), 2, (0.5, 1.5))
    with pytest.raises(ValueError, match="scale_range"):
        crops.sample_crop_params(jax.random.key(0), 2, (0.8, 0.5))
    with pytest.raises(ValueError, match="image_size"):
        crops.sample_crop_params(jax.random.key(0), 2, image_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        crops.sample_crop_params(jax.random.key(0), 0)


@pytest.mark.slow
def test_crops_under_jit():
    sample = jax.jit(crops.sample_crop_params, static_argnums=(1, 2), static_argnames=("image_size",))
    theta = sample(jax.random.key(1), 3, (0.5, 0.75), image_size=32)
    eager = crops.sample_crop_params(jax.random.key(1), 3, (0.5, 0.75), image_size=32)
    np.testing.assert_allclose(np.asarray(theta), np.asarray(eager), atol=1e-7)
    images = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
    crop = jax.jit(crops.affine_crop, static_argnums=2)
    np.testing.assert_allclose(
        np.asarray(crop(images, theta, (16, 16))), np.asarray(crops.affine_crop(images, theta, (16, 16))), atol=1e-6
    )
