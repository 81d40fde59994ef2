"""The dense-probe tasks as data: what COCO-Stuff-27 segmentation and NYUv2 depth bring to the one probe trainer
(probes/run.py), registered by `config.task` in TASKS.

Every function of a task takes the probe config (configs/probe_cocostuff.py, configs/probe_nyu.py); probe modules,
losses and metrics live in probes/segmentation.py and probes/depth.py, data sources in probes/data.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowfeat_jax.probes import data as data_lib
from flowfeat_jax.probes import depth as depth_lib
from flowfeat_jax.probes import pamr as pamr_lib
from flowfeat_jax.probes import segmentation as seg_lib

Config = ml_collections.ConfigDict
Batch = dict[str, Any]
# (probe, encoder features (B, h, w, C) | None, FlowFeat features (B, H, W, d) | None, batch) -> a scalar loss, or
# (inside the jitted eval step) a dict of predictions.
ProbeFn = Callable[[nnx.Module, Any, Any, Batch], Any]


class Scores(Protocol):
    """Accumulates one evaluation on the host: `add` per batch (with the eval step's outputs), `result` at the end."""

    def add(self, batch: Batch, out: dict[str, np.ndarray]) -> None: ...

    def result(self, num_images: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class ProbeTask:
    """What differs between the probe tasks; the trainer, checkpoints, resume and evaluation loop are shared.

    Attributes:
      build_probe: (config, widths {"encoder_dim", "flowfeat_dim"}, rngs) -> the probe module.
      uses_flowfeat: whether the task needs the FlowFeat features beyond `features.which` (PAMR's affinities).
      check: refuses bad task settings before any work.
      make_source: (config, split, crop, input_size) -> (number of items, load(i) -> dict of arrays).
      make_loss: config -> the training loss (ProbeFn).
      make_predict: config -> the eval step's predictions (ProbeFn); traced inside jit.
      make_scores: config -> a fresh Scores.
      picture_panels: (config, batch, eval outputs, index in batch) -> the panels after the input image, at the
        ground-truth size.
    """

    build_probe: Callable[[Config, dict[str, int], nnx.Rngs], nnx.Module]
    uses_flowfeat: Callable[[Config], bool]
    check: Callable[[Config], None]
    make_source: Callable[[Config, str, int, int], tuple[int, Callable[[int], Batch]]]
    make_loss: Callable[[Config], ProbeFn]
    make_predict: Callable[[Config], ProbeFn]
    make_scores: Callable[[Config], Scores]
    picture_panels: Callable[[Config, Batch, dict, int], list[np.ndarray]]


# --- COCO-Stuff-27 segmentation -------------------------------------------------------------------------------------
def _segmentation_probe(config: Config, widths: dict[str, int], rngs: nnx.Rngs) -> nnx.Module:
    p = config.probe
    cfg = seg_lib.SegmentationProbeConfig(num_classes=config.data.num_classes, num_heads=p.num_heads,
                                          with_norm=p.with_norm, downscale=p.downscale, **widths)
    return seg_lib.SegmentationProbe(cfg, rngs=rngs)


def _check_pamr(config: Config) -> None:
    if config.pamr.enabled:
        pamr_lib.kernel_offsets(config.pamr.kernel, config.pamr.size, config.pamr.dilations)


def _cocostuff_source(config: Config, split: str, crop: int, input_size: int):
    d = config.data
    if not d.root:
        raise ValueError("config.data.root is empty: point it at the COCO-Stuff folder (see probes/data.py)")
    image_list = d.train_list if split == d.train_split else d.eval_list
    source = data_lib.CocoStuffFolder(d.root, split, image_list or None)
    return len(source), lambda i: source.load(i, input_size, crop)


def _segmentation_loss(config: Config) -> ProbeFn:
    del config

    def loss(probe, encoder, flowfeat, batch):
        logits = probe(encoder, flowfeat, batch["labels"].shape[1:3])
        return seg_lib.cross_entropy_ignore(logits, batch["labels"])

    return loss


def _segmentation_predict(config: Config) -> ProbeFn:
    """Labels and confusion matrices of the probe and, with `pamr.enabled`, of its PAMR refinement."""
    num_classes, c = config.data.num_classes, config.pamr

    def predict(probe, encoder, flowfeat, batch):
        labels = batch["labels"]
        logits = probe(encoder, flowfeat, labels.shape[1:3])
        pred = jnp.argmax(logits, axis=-1)
        out = {"pred": pred, "confusion": seg_lib.confusion_matrix(pred, labels, num_classes)}
        if c.enabled:
            probs = pamr_lib.pamr(flowfeat, jax.nn.softmax(logits, axis=-1), kernel=c.kernel, size=c.size,
                                  dilations=tuple(c.dilations), num_iter=c.num_iter, scale=c.scale)
            out["pred_pamr"] = jnp.argmax(seg_lib.resize_bilinear(probs, labels.shape[1:3]), axis=-1)
            out["confusion_pamr"] = seg_lib.confusion_matrix(out["pred_pamr"], labels, num_classes)
        return out

    return predict


class SegmentationScores:
    """mIoU and pixel accuracy from the summed confusion matrices (plain and, when present, PAMR)."""

    def __init__(self, config: Config):
        self.num_classes = config.data.num_classes
        self.confusion = {k: np.zeros((self.num_classes, self.num_classes), np.int64) for k in ("", "_pamr")}

    def add(self, batch: Batch, out: dict[str, np.ndarray]) -> None:
        del batch
        self.confusion[""] += out["confusion"]
        if "confusion_pamr" in out:
            self.confusion["_pamr"] += out["confusion_pamr"]

    def result(self, num_images: int) -> dict[str, Any]:
        metrics = {"num_images": num_images, **{f"{k}{suffix}": v for suffix, c in self.confusion.items() if c.sum()
                                                for k, v in seg_lib.segmentation_scores(c).items()}}
        coarse = self.num_classes == data_lib.NUM_COARSE_CLASSES
        metrics["classes"] = list(data_lib.COARSE_CLASSES) if coarse else None
        return metrics


def _segmentation_panels(config: Config, batch: Batch, out: dict, b: int) -> list[np.ndarray]:
    k = config.data.num_classes
    panels = [seg_lib.colorize_labels(batch["labels"][b], k), seg_lib.colorize_labels(out["pred"][b], k)]
    if "pred_pamr" in out:
        panels.append(seg_lib.colorize_labels(out["pred_pamr"][b], k))
    return panels


SEGMENTATION = ProbeTask(
    build_probe=_segmentation_probe,
    uses_flowfeat=lambda config: bool(config.pamr.enabled),
    check=_check_pamr,
    make_source=_cocostuff_source,
    make_loss=_segmentation_loss,
    make_predict=_segmentation_predict,
    make_scores=SegmentationScores,
    picture_panels=_segmentation_panels,
)


# --- NYUv2 depth ----------------------------------------------------------------------------------------------------
def _depth_probe(config: Config, widths: dict[str, int], rngs: nnx.Rngs) -> nnx.Module:
    p = config.probe
    cfg = depth_lib.DepthProbeConfig(num_bins=p.num_bins, num_queries=p.num_queries, embed_dim=p.embed_dim,
                                     num_heads=p.num_heads, token_stride=p.token_stride, min_depth=p.min_depth,
                                     max_depth=p.max_depth, **widths)
    return depth_lib.DepthProbe(cfg, rngs=rngs)


def _nyu_source(config: Config, split: str, crop: int, input_size: int):
    d = config.data
    if d.source == "tfds":
        source = data_lib.NyuTfds(split, d.tfds_data_dir or None)
    elif d.source == "folder":
        if not d.root:
            raise ValueError("config.data.root is empty: point it at the NYUv2 folder (see probes/data.py)")
        source = data_lib.NyuFolder(d.root, split)
    else:
        raise ValueError(f"config.data.source must be 'folder' or 'tfds', got {d.source!r}")

    def load(i):
        image, depth = source.load(i)
        return data_lib.nyu_sample(image, depth, crop, input_size, source=f"{split}[{i}]")

    return len(source), load


def _depth_loss(config: Config) -> ProbeFn:
    """loss.silog_weight x scale-invariant log loss + loss.grad_weight x gradient loss on the valid pixels."""
    p, weights = config.probe, config.loss

    def loss(probe, encoder, flowfeat, batch):
        target = batch["depth"]
        pred, _ = probe(encoder, flowfeat, target.shape[1:3])
        valid = depth_lib.valid_depth(target, p.min_depth, p.max_depth)
        return (weights.silog_weight * depth_lib.silog_loss(pred, target, valid)
                + weights.grad_weight * depth_lib.gradient_loss(pred, target, valid))

    return loss


def _depth_predict(config: Config) -> ProbeFn:
    del config

    def predict(probe, encoder, flowfeat, batch):
        pred, _ = probe(encoder, flowfeat, batch["depth"].shape[1:3])
        return {"pred": pred}

    return predict


class DepthScores:
    """Per-image depth errors (Eigen crop, `eval.min_depth`..`eval.max_depth`) averaged over the images with valid
    ground truth; images without any are counted."""

    def __init__(self, config: Config):
        self.min_depth, self.max_depth = config.eval.min_depth, config.eval.max_depth
        self.per_image: list[dict[str, float]] = []
        self.skipped = 0

    def add(self, batch: Batch, out: dict[str, np.ndarray]) -> None:
        for pred, gt, eigen in zip(out["pred"], batch["depth"], batch["eigen"]):
            errors = depth_lib.image_depth_errors(pred, gt, eigen, min_depth=self.min_depth, max_depth=self.max_depth)
            self.skipped += errors is None
            if errors is not None:
                self.per_image.append(errors)

    def result(self, num_images: int) -> dict[str, Any]:
        del num_images  # the images scored are those with valid depth
        if not self.per_image:
            raise ValueError("no evaluation image has valid ground-truth depth")
        means = {k: float(np.mean([e[k] for e in self.per_image])) for k in self.per_image[0]}
        return {"num_images": len(self.per_image), "invalid_images": self.skipped, **means}


def _depth_panels(config: Config, batch: Batch, out: dict, b: int) -> list[np.ndarray]:
    gt, max_depth = batch["depth"][b], config.eval.max_depth
    invalid = ~(gt > config.eval.min_depth)
    return [depth_lib.colorize_depth(gt, max_depth, invalid), depth_lib.colorize_depth(out["pred"][b], max_depth)]


DEPTH = ProbeTask(
    build_probe=_depth_probe,
    uses_flowfeat=lambda config: False,
    check=lambda config: None,
    make_source=_nyu_source,
    make_loss=_depth_loss,
    make_predict=_depth_predict,
    make_scores=DepthScores,
    picture_panels=_depth_panels,
)

TASKS = {"segmentation": SEGMENTATION, "depth": DEPTH}


def get_task(name: str) -> ProbeTask:
    if name not in TASKS:
        raise ValueError(f"config.task must be {' or '.join(repr(t) for t in TASKS)}, got {name!r}")
    return TASKS[name]
