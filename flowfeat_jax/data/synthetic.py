"""A synthetic flow source: textured shapes moving with known translations.

Clearly not real video: it exists so the train step, the loop and the tests can run without exported records. Every
sample is a pure function of (seed, index), so iteration is deterministic and resumable from the step alone.

Each sample is a square RGB frame of side `frame_size` (smooth random texture, a few ellipses and rectangles with
their own textures) and the exact optical flow of that scene at side `flow_size`: the background moves by one global
translation and every shape by its own, so the flow is piecewise constant with sharp motion boundaries -- the
structure FlowFeat must learn. Flow is in the normalised units of recipe.md step 2 (u * 2 / W, v * 2 / H).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def _smooth_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour texture in [0, 1], (size, size, 3): a few random low-frequency sinusoids per channel."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    tex = np.zeros((size, size, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fy, fx = rng.uniform(0.5, 6.0, 2)
            phase = rng.uniform(0, 2 * np.pi)
            tex[..., c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    tex = (tex - tex.min()) / (np.ptp(tex) + 1e-6)
    return tex


def synthetic_sample(seed: int, index: int, frame_size: int, flow_size: int, num_shapes: int = 3) -> dict:
    """One (frame, flow) pair; deterministic in (seed, index).

    Returns a dict with `frame` uint8 (S, S, 3), `flow` float32 (F, F, 2) in normalised units, and `video`, `t`,
    `partner` int32 ids shaped like the record pipeline's.
    """
    rng = np.random.default_rng([seed, index])
    size = flow_size
    frame = _smooth_texture(rng, size)
    # Background motion in pixels of the flow grid; the sign convention is flow = position(t1) - position(t0).
    flow = np.broadcast_to(rng.uniform(-3, 3, 2).astype(np.float32), (size, size, 2)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(num_shapes):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        ry, rx = rng.uniform(0.08, 0.25, 2) * size
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        frame[inside] = _smooth_texture(rng, size)[inside]
        flow[inside] = rng.uniform(-8, 8, 2).astype(np.float32)
    if frame_size != size:
        # Nearest-neighbour upscale keeps the texture edges aligned with the flow boundaries.
        idx = (np.arange(frame_size) * size) // frame_size
        frame = frame[idx][:, idx]
    flow_normalised = flow * (2.0 / size)
    return {
        "frame": np.round(frame * 255).astype(np.uint8),
        "flow": flow_normalised.astype(np.float32),
        "video": np.int32(index),
        "t": np.int32(0),
        "partner": np.int32(1),
    }


def synthetic_batches(
    seed: int,
    batch_size: int,
    frame_size: int,
    flow_size: int,
    start_step: int = 0,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches; global batch k holds samples k*B .. k*B + B - 1 and this process yields its contiguous slice,
    so resuming at a step is exact and the global batch does not depend on the number of processes."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} does not split over {process_count} processes")
    local = batch_size // process_count
    step = start_step
    while True:
        first = step * batch_size + process_index * local
        samples = [synthetic_sample(seed, first + i, frame_size, flow_size) for i in range(local)]
        yield {key: np.stack([s[key] for s in samples]) for key in samples[0]}
        step += 1
