"""Random affine crops of the training frame and its teacher flow (recipe step 3).

The reference (dataloader.py `MaskRandScaleCrop`) draws, per sample, a crop box of a random fraction of the frame
side at a random integer position, and turns it into a 2×3 affine `theta` for torch `F.affine_grid`. model.py
`FlowFeatTrain.crop_view` then samples the 448² frame and the 224² teacher flow with the same grid
(`F.grid_sample`, bilinear, zero padding, align_corners=False). Everything here is channels-last and jit-safe.

Coordinates: a grid holds (x, y) in [-1, 1], -1 and +1 being the outer edges of the first and last pixel
(align_corners=False), x along W and y along H, as in torch.
"""

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

RELEASED_SCALE_RANGE = (0.5, 0.75)  # config/ytvos.yaml train.crop_range
RELEASED_IMAGE_SIZE = 448  # side of the square training frame (recipe step 2)


def _height_width(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int side or an (H, W) pair as two positive ints, or a ValueError naming the argument."""
    height, width = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return int(height), int(width)


def crop_theta(
    top: jax.Array,
    left: jax.Array,
    box_height: jax.Array,
    box_width: jax.Array,
    scale: jax.Array,
    image_size: int | Sequence[int] = RELEASED_IMAGE_SIZE,
    *,
    rotation_deg: float | jax.Array = 0.0,
    flip: bool | jax.Array = False,
) -> jax.Array:
    """The affine `theta` of one crop box per sample, as dataloader.py `MaskRandScaleCrop.get_affine(_inv)`.

    Derivation (aspect a = H/W, s = scale, c/n = cos/sin of the rotation, f = -1 if flipped else 1). The box
    centre is displaced from the image centre by dy = top + box_h/2 - H/2, dx = left + box_w/2 - W/2 pixels,
    which the reference normalises by the integer half sides W//2 and H//2. It first builds the image→crop map
        M = (1/s) [[f c, n a, t_x], [-n/a, c, t_y]],  t_x = -(c dx + n dy)/(W//2),  t_y = -(-n dx + c dy)/(H//2),
    and then "inverts" it by transposing the rotation with the aspect ratio and rescaling by s², which gives the
    crop→image map
        theta = [[s L, -L t]],  L = [[f c, -n a], [n/a, c]],  t = (t_x, t_y).
    With the released settings (no rotation, no flip): theta = [[s, 0, dx/(W//2)], [0, s, dy/(H//2)]]. The
    transpose is the true inverse only when f = 1 or the rotation is a multiple of 90°; the released code fixes
    both off, and we keep its formula as written.

    Note `scale` is the drawn fraction (a float), while the box size is its integer floor, exactly as the reference.

    Args:
      top, left: (B,) integer offsets of the crop box (rows, columns).
      box_height, box_width: (B,) integer box size in pixels.
      scale: (B,) crop fraction s of the side.
      image_size: side or (H, W) of the image the box lies in.
      rotation_deg: rotation angle in degrees (the released code fixes 0).
      flip: horizontal flip (the released code fixes off).

    Returns:
      theta: (B, 2, 3) float32, for `affine_grid`.
    """
    height, width = _height_width(image_size, "image_size")
    aspect = height / width
    scale = jnp.asarray(scale, jnp.float32)
    dy = jnp.asarray(top, jnp.float32) + jnp.asarray(box_height, jnp.float32) / 2 - height / 2
    dx = jnp.asarray(left, jnp.float32) + jnp.asarray(box_width, jnp.float32) / 2 - width / 2
    angle = jnp.deg2rad(jnp.asarray(rotation_deg, jnp.float32))
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    mirror = jnp.where(jnp.asarray(flip), -1.0, 1.0)
    # Translation column of the image→crop map, before its 1/s factor.
    shift_x = -(cos * dx + sin * dy) / (width // 2)
    shift_y = -(-sin * dx + cos * dy) / (height // 2)
    # The reference's inverse: rotation transposed (aspect-corrected), translation mapped back through it.
    lin = (mirror * cos, -sin * aspect, sin / aspect, cos)  # row-major 2×2, before the factor s
    offset_x = -(lin[0] * shift_x + lin[1] * shift_y)
    offset_y = -(lin[2] * shift_x + lin[3] * shift_y)
    rows = [
        jnp.stack(jnp.broadcast_arrays(scale * lin[0], scale * lin[1], offset_x), axis=-1),
        jnp.stack(jnp.broadcast_arrays(scale * lin[2], scale * lin[3], offset_y), axis=-1),
    ]
    return jnp.stack(jnp.broadcast_arrays(*rows), axis=-2)  # B 2 3


def sample_crop_params(
    key: jax.Array,
    batch_size: int,
    scale_range: Sequence[float] = RELEASED_SCALE_RANGE,
    *,
    image_size: int | Sequence[int] = RELEASED_IMAGE_SIZE,
    rotation_deg: float = 0.0,
    flip: bool = False,
) -> jax.Array:
    """Draws `batch_size` crop thetas with the distribution of dataloader.py `MaskRandScaleCrop` (recipe step 3).

    Per sample: s ~ U[lo, hi); box = floor(s·H) × floor(s·W); top ~ U{0..H-box_h}, left ~ U{0..W-box_w}
    (inclusive, independent, like Python's `random.randint`); theta from `crop_theta`. The reference hard-codes
    no rotation and no flip in `MaskRandScaleCrop.__call__`; `rotation_deg` and `flip` fix other constants.

    Args:
      key: a JAX PRNG key.
      batch_size: number of crops B.
      scale_range: (lo, hi) with 0 < lo <= hi <= 1 (the reference asserts s < 1).
      image_size: side or (H, W) of the frame the box lies in; the box is integer-valued in its pixels.

    Returns:
      theta: (B, 2, 3) float32.
    """
    low, high = (float(v) for v in scale_range)
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi <= 1, got {tuple(scale_range)!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    height, width = _height_width(image_size, "image_size")
    key_scale, key_top, key_left = jax.random.split(key, 3)
    scale = jax.random.uniform(key_scale, (batch_size,), jnp.float32, minval=low, maxval=high)
    box_height = jnp.floor(scale * height).astype(jnp.int32)
    box_width = jnp.floor(scale * width).astype(jnp.int32)
    top = jax.random.randint(key_top, (batch_size,), 0, height - box_height + 1)
    left = jax.random.randint(key_left, (batch_size,), 0, width - box_width + 1)
    return crop_theta(top, left, box_height, box_width, scale, (height, width), rotation_deg=rotation_deg, flip=flip)


def affine_grid(theta: jax.Array, out_hw: Sequence[int]) -> jax.Array:
    """Sampling grid of an affine map, as torch `F.affine_grid(theta, (B, C, H, W), align_corners=False)`.

    Output pixel (i, j) has normalised centre x_j = (2j + 1)/W - 1, y_i = (2i + 1)/H - 1 and samples the input at
    theta @ (x_j, y_i, 1). Written elementwise (no matmul) so GPU TF32 matmul defaults cannot round it.

    Args:
      theta: (B, 2, 3).
      out_hw: (H, W) of the output.

    Returns:
      grid: (B, H, W, 2) float32 of (x, y).
    """
    theta = jnp.asarray(theta, jnp.float32)
    if theta.ndim != 3 or theta.shape[1:] != (2, 3):
        raise ValueError(f"theta must have shape (B, 2, 3), got {theta.shape}")
    height, width = _height_width(out_hw, "out_hw")
    xs = (2 * jnp.arange(width, dtype=jnp.float32) + 1) / width - 1
    ys = (2 * jnp.arange(height, dtype=jnp.float32) + 1) / height - 1
    x, y = xs[None, None, :], ys[None, :, None]
    t = theta[:, :, :, None, None]  # B 2 3 1 1
    grid_x = t[:, 0, 0] * x + t[:, 0, 1] * y + t[:, 0, 2]
    grid_y = t[:, 1, 0] * x + t[:, 1, 1] * y + t[:, 1, 2]
    return jnp.stack([grid_x, grid_y], axis=-1)


def grid_sample_bilinear(images: jax.Array, grid: jax.Array) -> jax.Array:
    """Bilinear sampling, as torch `F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`.

    A grid point (x, y) sits at pixel coordinates ix = ((x + 1)·W - 1)/2, iy = ((y + 1)·H - 1)/2. The result is
    the weighted sum of its four neighbours (floor/floor+1 in each axis) with the bilinear weights; neighbours
    outside the image contribute zero. One gather per neighbour over the flattened image, vmapped over the batch.

    Args:
      images: (B, H, W, C); integer images are sampled as float32.
      grid: (B, Ho, Wo, 2) of (x, y) in normalised coordinates.

    Returns:
      (B, Ho, Wo, C), the dtype of `images` (float32 for integer images).
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, H, W, C), got {images.shape}")
    if grid.ndim != 4 or grid.shape[-1] != 2 or grid.shape[0] != images.shape[0]:
        raise ValueError(f"grid must have shape (B={images.shape[0]}, Ho, Wo, 2), got {grid.shape}")
    out_dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
    batch, height, width, channels = images.shape
    _, out_h, out_w, _ = grid.shape
    grid = grid.astype(jnp.float32)
    ix = ((grid[..., 0] + 1) * width - 1) / 2
    iy = ((grid[..., 1] + 1) * height - 1) / 2
    # Clamp far-away points before the integer cast; anything outside [-1, size] is padding either way.
    ix = jnp.clip(ix, -2.0, width + 1.0)
    iy = jnp.clip(iy, -2.0, height + 1.0)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    flat = images.reshape(batch, height * width, channels)

    def gather(rows, cols):
        inside = (cols >= 0) & (cols <= width - 1) & (rows >= 0) & (rows <= height - 1)
        index = (jnp.clip(rows, 0, height - 1) * width + jnp.clip(cols, 0, width - 1)).astype(jnp.int32)
        values = jax.vmap(lambda image, idx: image[idx])(flat, index.reshape(batch, -1))
        return values.reshape(batch, out_h, out_w, channels).astype(jnp.float32), inside[..., None]

    out = jnp.zeros((batch, out_h, out_w, channels), jnp.float32)
    for rows, cols, weight in (
        (y0, x0, (x1 - ix) * (y1 - iy)),
        (y0, x1, (ix - x0) * (y1 - iy)),
        (y1, x0, (x1 - ix) * (iy - y0)),
        (y1, x1, (ix - x0) * (iy - y0)),
    ):
        values, inside = gather(rows, cols)
        out = out + jnp.where(inside, values * weight[..., None], 0.0)
    return out.astype(out_dtype)


def affine_crop(images: jax.Array, theta: jax.Array, out_hw: Sequence[int]) -> jax.Array:
    """Affine crop of NHWC images to `out_hw`, as model.py `FlowFeatTrain.crop_view` (recipe step 3)."""
    return grid_sample_bilinear(images, affine_grid(theta, out_hw))
