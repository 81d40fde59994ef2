"""DAVIS J&F scoring, semi-supervised task, with the exact rules of davis2017-evaluation.

Per object k of a sequence (davis2017/evaluation.py `_evaluate_semisupervised`, metrics.py, utils.py):
- ground-truth objects are 1..max(first annotation); prediction ids above that are an error; objects never predicted
  count as empty masks; the first and the last frame are not scored;
- J = |P ∩ G| / |P ∪ G| per frame, 1 where the union is empty (`db_eval_iou`);
- F = 2·p·r / (p + r) per frame on 1-pixel boundary maps (`_seg2bmap`), where precision p is the fraction of
  predicted boundary pixels within a disk of radius ceil(0.008·image diagonal) of a ground-truth boundary pixel and
  recall r the converse (`f_measure`); p = 1, r = 0 when only the prediction's boundary is empty and vice versa,
  both 1 when both are empty, F = 0 when p + r = 0;
- per object: mean, recall = fraction of frames > 0.5, decay = mean of the first minus the last of 4 bins
  (`db_statistics`); the global J and F means are plain means over all objects, J&F their average.
Everything is vectorised over objects and frames; dilation is one OpenCV call over frames tiled with gaps.
"""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Sequence

import cv2
import numpy as np

from flowfeat_jax.eval import davis
from flowfeat_jax.progress import progress as progress_bar

BOUNDARY_THRESHOLD = 0.008
METRIC_KEYS = ("J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay")


def disk(radius: int) -> np.ndarray:
    """Binary disk footprint (2r+1, 2r+1) uint8: x² + y² <= r² (as skimage.morphology.disk, strict radius)."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).astype(np.uint8)


def boundary_radius(height: int, width: int, bound_th: float = BOUNDARY_THRESHOLD) -> int:
    """Boundary tolerance in pixels: bound_th itself when >= 1, else ceil(bound_th · image diagonal)."""
    # np.linalg.norm as the reference: the ceil sits on a float product, so the last ulp of the diagonal matters.
    return int(bound_th) if bound_th >= 1 else int(np.ceil(bound_th * np.linalg.norm((height, width))))


def boundary_map(masks: np.ndarray) -> np.ndarray:
    """1-pixel boundaries (..., H, W) bool of binary masks, shifted half a pixel towards the origin (`_seg2bmap`).

    A pixel is boundary when it differs from its east, south or south-east neighbour; in the last row only the east
    neighbour counts, in the last column only the south one, and the bottom-right pixel never is boundary.
    """
    seg = masks.astype(bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[..., :, :-1] = seg[..., :, 1:]
    south[..., :-1, :] = seg[..., 1:, :]
    south_east[..., :-1, :-1] = seg[..., 1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[..., -1, :] = seg[..., -1, :] ^ east[..., -1, :]
    bmap[..., :, -1] = seg[..., :, -1] ^ south[..., :, -1]
    bmap[..., -1, -1] = False
    return bmap


def dilate(masks: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of (N, H, W) masks by disk(radius), one cv2.dilate over the frames tiled vertically.

    Frames are separated by `radius` zero rows, so no frame reaches into the next; zeros outside a frame change
    nothing under a max filter, which matches OpenCV's default border.
    """
    count, height, width = masks.shape
    tiled = np.zeros((count, height + radius, width), np.uint8)
    tiled[:, :height] = masks
    dilated = cv2.dilate(tiled.reshape(count * (height + radius), width), disk(radius))
    return dilated.reshape(count, height + radius, width)[:, :height].astype(bool)


def jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Region similarity J per mask, (..., H, W) bool -> (...) float64; 1 where the union is empty."""
    intersection = np.sum(gt & pred, axis=(-2, -1))
    union = np.sum(gt | pred, axis=(-2, -1))
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def f_measure(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUNDARY_THRESHOLD) -> np.ndarray:
    """Boundary F-measure per mask, (..., H, W) bool -> (...) float64 (davis2017/metrics.py `f_measure`)."""
    lead_shape, (height, width) = gt.shape[:-2], gt.shape[-2:]
    radius = boundary_radius(height, width, bound_th)
    gt_boundary = boundary_map(gt).reshape(-1, height, width)
    pred_boundary = boundary_map(pred).reshape(-1, height, width)
    dilated = dilate(np.concatenate([gt_boundary, pred_boundary]), radius)
    gt_dilated, pred_dilated = dilated[: len(gt_boundary)], dilated[len(gt_boundary):]

    n_gt = gt_boundary.sum(axis=(1, 2)).astype(np.float64)
    n_pred = pred_boundary.sum(axis=(1, 2)).astype(np.float64)
    precision = np.where(n_pred > 0, (pred_boundary & gt_dilated).sum(axis=(1, 2)) / np.maximum(n_pred, 1), 1.0)
    recall = np.where(n_gt > 0, (gt_boundary & pred_dilated).sum(axis=(1, 2)) / np.maximum(n_gt, 1), 1.0)
    # An empty predicted boundary against a non-empty one: precision 1, recall 0 (and the converse).
    precision = np.where((n_pred > 0) & (n_gt == 0), 0.0, precision)
    recall = np.where((n_pred == 0) & (n_gt > 0), 0.0, recall)
    total = precision + recall
    f = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1.0), 0.0)
    return f.reshape(lead_shape)


def db_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """Mean, recall (fraction > 0.5) and decay (first minus last of 4 bins) of per-frame values (`db_statistics`).

    Bin edges are round(linspace(1, n, 5)) - 1, bin i spanning edges[i]..edges[i + 1] inclusive, so neighbouring
    bins share their edge frame.
    """
    per_frame = np.asarray(per_frame, np.float64)
    edges = (np.round(np.linspace(1, len(per_frame), 5) + 1e-10) - 1).astype(np.int64)
    first_bin = per_frame[edges[0]: edges[1] + 1]
    last_bin = per_frame[edges[3]: edges[4] + 1]
    return (float(np.nanmean(per_frame)), float(np.mean(per_frame > 0.5)),
            float(np.nanmean(first_bin) - np.nanmean(last_bin)))


def score_sequence(name: str, gt_labels: np.ndarray, pred_labels: np.ndarray,
                   bound_th: float = BOUNDARY_THRESHOLD) -> dict[str, dict[str, float]]:
    """Per-object statistics of one sequence: {'<name>_<k>': {J_mean, J_recall, J_decay, F_mean, F_recall, F_decay}}.

    Args:
      name: sequence name.
      gt_labels: (T, H, W) ground-truth label maps of all T frames (void already turned into background).
      pred_labels: (T, H, W) or (T - 2, H, W) predicted label maps; with T - 2 they are frames 1..T-2.
      bound_th: boundary tolerance (fraction of the diagonal, or pixels when >= 1).
    """
    gt_labels = np.asarray(gt_labels)
    if gt_labels.ndim != 3 or len(gt_labels) < 3:
        raise ValueError(f"{name}: need (T, H, W) ground truth with T >= 3, got shape {gt_labels.shape}")
    gt_scored = gt_labels[1:-1]
    pred_labels = np.asarray(pred_labels)
    if len(pred_labels) == len(gt_labels):
        pred_labels = pred_labels[1:-1]
    if pred_labels.shape != gt_scored.shape:
        raise ValueError(f"{name}: predictions of shape {pred_labels.shape} do not match ground truth "
                         f"{gt_labels.shape} (all frames) or {gt_scored.shape} (frames 1..T-2)")
    num_objects = int(gt_labels[0].max())
    highest = int(pred_labels.max(initial=0))
    if highest > num_objects:
        frame = int(np.argmax(pred_labels.reshape(len(pred_labels), -1).max(axis=1) > num_objects)) + 1
        raise ValueError(f"{name}: frame {frame} predicts object id {highest} but the ground truth has "
                         f"{num_objects} object(s)")
    scores = {}
    for k in range(1, num_objects + 1):  # one object at a time keeps memory at a few (T, H, W) masks
        gt_masks, pred_masks = gt_scored == k, pred_labels == k
        j_mean, j_recall, j_decay = db_statistics(jaccard(gt_masks, pred_masks))
        f_mean, f_recall, f_decay = db_statistics(f_measure(gt_masks, pred_masks, bound_th))
        scores[f"{name}_{k}"] = dict(J_mean=j_mean, J_recall=j_recall, J_decay=j_decay,
                                     F_mean=f_mean, F_recall=f_recall, F_decay=f_decay)
    return scores


def global_scores(objects: dict[str, dict[str, float]]) -> dict[str, float]:
    """Means over objects of every statistic plus JF_mean = (J_mean + F_mean) / 2 (evaluation_method.py)."""
    if not objects:
        raise ValueError("no objects were scored")
    means = {key: float(np.mean([stats[key] for stats in objects.values()])) for key in METRIC_KEYS}
    return {"JF_mean": (means["J_mean"] + means["F_mean"]) / 2, **means}


def score_results(davis_root: str | pathlib.Path, results_dir: str | pathlib.Path,
                  sequences: Sequence[str] | None = None, split: str = "val",
                  bound_th: float = BOUNDARY_THRESHOLD, progress: bool = True, max_frames: int | None = None) -> dict:
    """Score result PNGs `results_dir/<seq>/<frame>.png` against `davis_root` annotations.

    `max_frames` scores only the first frames of each sequence (smoke runs; the last of them is then not scored).
    Returns {"objects": {"<seq>_<k>": {...}}, "global": {"JF_mean", "J_mean", ..., "F_decay"}}.
    """
    sequences = list(sequences) if sequences else davis.list_sequences(davis_root, split)
    objects = {}
    for sequence in progress_bar(sequences, desc="J&F", disable=not progress):
        gt_labels, frame_ids = davis.read_annotations(davis_root, sequence, max_frames=max_frames)
        pred_labels = davis.read_result_masks(results_dir, sequence, frame_ids[1:-1], gt_labels.shape[1:],
                                              max_id=int(gt_labels[0].max()))
        objects.update(score_sequence(sequence, gt_labels, pred_labels, bound_th))
    return {"objects": objects, "global": global_scores(objects)}


def _rows(scores: dict) -> list[tuple[str, dict[str, float]]]:
    rows = [(name, {"JF_mean": (stats["J_mean"] + stats["F_mean"]) / 2, **stats})
            for name, stats in scores["objects"].items()]
    return rows + [("global", scores["global"])]


def format_table(scores: dict) -> str:
    """A fixed-width text table: one row per object and a last 'global' row."""
    keys = ("JF_mean", *METRIC_KEYS)
    width = max(len(name) for name, _ in _rows(scores))
    lines = [f"{'object':<{width}}  " + "  ".join(f"{key:>8}" for key in keys)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{stats[key]:8.4f}" for key in keys) for name, stats in _rows(scores)]
    return "\n".join(lines)


def write_csv(scores: dict, path: str | pathlib.Path) -> None:
    """The table of `format_table` as CSV (columns object, JF_mean, J_mean, ..., F_decay)."""
    keys = ("JF_mean", *METRIC_KEYS)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("object", *keys))
        for name, stats in _rows(scores):
            writer.writerow((name, *(f"{stats[key]:.6f}" for key in keys)))
