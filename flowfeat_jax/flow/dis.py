"""OpenCV DIS optical flow (Kroeger et al., ECCV 2016) as a cheap CPU flow method.

Not a teacher of the paper (SEA-RAFT / RAFT are, recipe.md step 9): DIS is here for quick exports, tests and CPU-only
machines. Preset MEDIUM (finest scale 1 = half resolution, 8x8 patches at stride 3, 25 gradient-descent and 5
variational-refinement iterations): FAST and ULTRAFAST stop at quarter resolution (ULTRAFAST without refinement), too
coarse for 224^2 frames; MEDIUM runs at ~60 pairs/s at 224^2 on one loaded CPU core. DIS runs on 8-bit grayscale;
colour frames are converted with OpenCV's BT.601 weights.
"""

import cv2
import numpy as np

PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
DEFAULT_PRESET = "medium"


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 grayscale (H, W), the input DIS expects."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


class DisFlow:
    """Flow method: (img1, img2) uint8 (N, H, W, 3) -> flow img1->img2 in pixels, float32 (N, H, W, 2).

    flow[n, y, x] = (u, v) such that img1[n, y, x] matches img2[n, y + v, x + u] (the RAFT convention).
    """

    def __init__(self, preset: str = DEFAULT_PRESET):
        if preset not in PRESETS:
            raise ValueError(f"unknown DIS preset {preset!r}; choose one of {sorted(PRESETS)}")
        self.preset = preset
        self._dis = cv2.DISOpticalFlow_create(PRESETS[preset])

    def __call__(self, img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
        if img1.shape != img2.shape or img1.ndim != 4 or img1.shape[-1] != 3 or img1.dtype != np.uint8:
            raise ValueError(f"expected two uint8 (N, H, W, 3) batches of one shape, got {img1.shape}, {img2.shape}")
        flows = [self._dis.calc(to_gray(a), to_gray(b), None) for a, b in zip(img1, img2, strict=True)]
        return np.stack(flows).astype(np.float32)
