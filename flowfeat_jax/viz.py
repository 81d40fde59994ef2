"""Pictures of dense features: a 3-component PCA as RGB, and PNG writing."""

import pathlib

import numpy as np
from PIL import Image


def pca_image(features: np.ndarray, *, clip_percentile: float = 1.0) -> np.ndarray:
    """Project features (h, w, C) on their top-3 principal components and map them to RGB uint8 (h, w, 3).

    Each component is stretched from its `clip_percentile` to its (100 - clip_percentile) percentile to [0, 255], so
    a few outlier tokens do not wash out the picture. Component signs are fixed (largest loading positive) so the
    colours are deterministic.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 3:
        raise ValueError(f"pca_image expects features (h, w, C), got shape {features.shape}")
    h, w, c = features.shape
    flat = features.reshape(h * w, c)
    flat = flat - flat.mean(axis=0)
    _, _, components = np.linalg.svd(flat, full_matrices=False)  # rows: principal directions, by variance
    components = components[:3]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    projected = flat @ (components * signs[:, None]).T  # (h*w, k), k = min(3, C, h*w)
    projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    low = np.percentile(projected, clip_percentile, axis=0)
    high = np.percentile(projected, 100 - clip_percentile, axis=0)
    scaled = (projected - low) / np.maximum(high - low, 1e-12)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8).reshape(h, w, 3)


def save_png(path: str | pathlib.Path, image: np.ndarray, *, scale: int = 1) -> None:
    """Write a uint8 image (h, w, 3) or (h, w) as PNG, enlarged `scale` times with nearest-neighbour blocks."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"save_png expects a uint8 (h, w[, 3]) image, got {image.dtype} {image.shape}")
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
