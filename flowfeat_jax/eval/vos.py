"""DAVIS video object segmentation end to end: features -> KNN propagation / linear probe -> PNGs -> J&F.

`evaluate_sequences` takes any `feature_fn(frames uint8 (B, H, W, 3)) -> {"encoder": (B, h, w, C),
"flowfeat": (B, H, W, d) or None}` called on frames already resized to the network input size
(`davis_input_size`: 480 high, width floored to a multiple of 64). Frames go through it in chunks, and the features
are reduced at once, so a sequence never holds its dense features in memory:
- "linear": the probe is fitted on frame 0 (FlowFeat + upsampled encoder features) and each chunk is classified;
- "knn": FlowFeat features are average-pooled to `knn_stride` pixels (encoder features are used as they are when
  there are none) and kept; the neighbourhood radius is scaled to cover DINO's 12 patches: 12 · p / knn_stride.
Per protocol it writes `out_dir/<protocol>/<seq>/<frame>.png` (DAVIS palette), a few overlay pictures in
`out_dir/<protocol>/overlays/`, and `out_dir/<protocol>/SCORES.json` + `scores.csv` from the J&F scorer.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from flowfeat_jax.eval import davis, jf, knn, linear_probe
from flowfeat_jax.progress import progress

PROTOCOLS = ("knn", "linear")
FeatureFn = Callable[[np.ndarray], dict]


def overlay(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colour of each object over an RGB frame (davis2017/utils.py overlay_semantic_mask)."""
    colours = davis.davis_palette()[labels]
    blended = (alpha * frame + (1 - alpha) * colours).astype(np.uint8)
    return np.where(labels[..., None] > 0, blended, frame)


def _resize_frames(frames: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(frame).resize(input_hw[::-1], Image.BILINEAR)) for frame in frames])


def _knn_features(features: dict, stride: int) -> jax.Array:
    if features.get("flowfeat") is None:
        return features["encoder"]
    return knn.pool_features(features["flowfeat"], stride)


def segment_sequence(feature_fn: FeatureFn, frames: np.ndarray, first_annotation: np.ndarray,
                     protocols: Sequence[str] = PROTOCOLS, *, input_multiple: int = 64, short_side: int = 480,
                     frames_per_call: int = 8, knn_stride: int = 8, knn_kwargs: dict | None = None,
                     probe_kwargs: dict | None = None) -> dict[str, np.ndarray]:
    """Predicted label maps (T, H0, W0) uint8 per protocol for one video.

    Args:
      feature_fn: frames uint8 (B, H, W, 3) at the input size -> dict(encoder=(B, h, w, C), flowfeat=... or None).
      frames: (T, H0, W0, 3) uint8 original frames.
      first_annotation: (H0, W0) uint8 labels of frame 0.
      protocols: any of "knn", "linear".
      input_multiple, short_side: network input size (davis_input_size).
      frames_per_call: frames per feature_fn call.
      knn_stride: pooling stride of FlowFeat features for KNN.
      knn_kwargs: overrides of knn.knn_segment (n_last_frames, topk, temperature, radius, query_batch).
      probe_kwargs: overrides of linear_probe.fit_first_frame (key, steps, learning_rate, weight_decay).
    """
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {PROTOCOLS}")
    input_hw = davis.davis_input_size(*frames.shape[1:3], multiple=input_multiple, short_side=short_side)
    out_hw = first_annotation.shape
    weights, knn_chunks, probe_chunks = None, [], []
    patch = None
    for start in range(0, len(frames), frames_per_call):
        features = feature_fn(_resize_frames(frames[start: start + frames_per_call], input_hw))
        patch = input_hw[0] // features["encoder"].shape[1]
        flowfeat = features.get("flowfeat")
        if "linear" in protocols:
            if weights is None:
                weights = linear_probe.fit_first_frame(None if flowfeat is None else flowfeat[0],
                                                       features["encoder"][0], first_annotation, input_hw,
                                                       **(probe_kwargs or {}))
            probe_chunks.append(np.asarray(linear_probe.predict_labels(weights, flowfeat, features["encoder"],
                                                                       input_hw, out_hw)).astype(np.uint8))
        if "knn" in protocols:
            knn_chunks.append(np.asarray(_knn_features(features, knn_stride)))
    predictions = {}
    if "linear" in protocols:
        predictions["linear"] = np.concatenate(probe_chunks)
    if "knn" in protocols:
        knn_features = np.concatenate(knn_chunks)
        stride = input_hw[0] // knn_features.shape[1]
        kwargs = {"radius": max(1, round(12 * patch / stride)), **(knn_kwargs or {})}
        predictions["knn"] = knn.knn_segment(knn_features, first_annotation, input_hw, **kwargs)
    return predictions


def evaluate_sequences(feature_fn: FeatureFn, davis_root: str | pathlib.Path, sequences: Sequence[str] | None,
                       protocols: Sequence[str] | str, out_dir: str | pathlib.Path, *, split: str = "val",
                       max_frames: int | None = None, overlay_frames: int = 3, **segment_kwargs) -> dict[str, dict]:
    """Segment, write and score DAVIS sequences; returns {protocol: {"objects": ..., "global": ...}}.

    `max_frames` truncates every sequence (for smoke runs; the scores then cover those frames only).
    `segment_kwargs` go to `segment_sequence`.
    """
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    sequences = list(sequences) if sequences else davis.list_sequences(davis_root, split)
    out_dir = pathlib.Path(out_dir)
    for sequence in progress(sequences, desc="DAVIS sequences"):
        frames = davis.read_frames(davis_root, sequence, max_frames=max_frames)
        annotations, frame_ids = davis.read_annotations(davis_root, sequence, max_frames=max_frames)
        if len(frames) != len(annotations):
            raise ValueError(f"{sequence}: {len(frames)} frames but {len(annotations)} annotations")
        predictions = segment_sequence(feature_fn, frames, annotations[0], protocols, **segment_kwargs)
        for protocol, labels in predictions.items():
            for frame_id, label in zip(frame_ids, labels):
                davis.write_index_png(out_dir / protocol / sequence / f"{frame_id}.png", label)
            picks = np.unique(np.linspace(0, len(frames) - 1, overlay_frames).round().astype(int))
            (out_dir / protocol / "overlays").mkdir(parents=True, exist_ok=True)
            for index in picks:
                picture = np.concatenate([overlay(frames[index], annotations[index]),
                                          overlay(frames[index], labels[index])], axis=1)  # ground truth | prediction
                Image.fromarray(picture).save(out_dir / protocol / "overlays" / f"{sequence}_{frame_ids[index]}.png")
    results = {}
    for protocol in protocols:
        scores = jf.score_results(davis_root, out_dir / protocol, sequences, max_frames=max_frames)
        (out_dir / protocol / "SCORES.json").write_text(json.dumps(scores, indent=2))
        jf.write_csv(scores, out_dir / protocol / "scores.csv")
        print(f"[{protocol}]\n{jf.format_table(scores)}")
        results[protocol] = scores
    return results
