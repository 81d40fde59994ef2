"""The train step's settings: one frozen dataclass per config section (or part of one), fields named as the keys.

The JAX step (train/step.py StepConfig) and the torch reference step (torch_ref/train.py TorchStepConfig) are built
from the same dataclasses, so a setting exists once: its key and default in flowfeat_jax/config.py `base_config()`.
`LossConfig(**config.loss)` and `EmaConfig(**config.ema)` take a whole section: a key added there and not here is a
TypeError at the start of a run, never a setting silently ignored. `from_section` takes a dataclass's fields out of
a section that other code reads too (config.train). This module imports nothing of the package, so every layer may
use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """config.loss, whole: Eq. 7 and the ridge map (recipe.md steps 2, 5, 6; model.py FlowFeatTrain)."""

    flow: str  # 'l1' (released) | 'l2' (ablation)
    flow_weight: float  # weight of L_flow; 0 = the "no L_L1" ablation
    grad_weight: float  # weight of the focal gradient loss L_grad; 0 = the "no L_grad" ablation
    sigma: float  # focal gradient loss sigma
    ridge_alpha: float
    flow_map: str  # 'ridge' (released: per-image ridge map from the teacher) | 'linear' (Tab. 3 naive, learned)
    norm_flow: bool  # standardise the teacher flow per image and channel


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    """config.ema, whole: the EMA teacher and its ema_pytorch schedule (recipe.md step 8)."""

    enabled: bool  # False: the teacher is the (stop-gradient) online decoder
    beta: float
    update_after_step: int
    update_every: int
    power: float
    inv_gamma: float


@dataclasses.dataclass(frozen=True)
class CropConfig:
    """config.train's crop fields (recipe.md step 3)."""

    input_size: int  # side of each square crop fed to the encoder
    crop_scale: tuple[float, float]  # (low, high) side of a crop as a fraction of the frame side


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """config.train's optimiser fields: AdamW at a constant learning rate (recipe.md step 7)."""

    lr: float
    b1: float
    b2: float
    weight_decay: float


def from_section(cls: type[T], section: Mapping) -> T:
    """The dataclass `cls` with each field read from the key of its name in a config section (a ConfigDict or a
    dict); sequences become tuples, so the result stays hashable."""
    values = {}
    for field in dataclasses.fields(cls):
        value = section[field.name]
        values[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return cls(**values)
