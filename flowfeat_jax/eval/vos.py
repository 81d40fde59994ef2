"""DAVIS video object segmentation end to end, on device: features -> KNN / linear probe -> uint8 maps -> PNGs -> J&F.

A feature function `feature_fn(params, frames uint8 (B, H, W, 3)) -> (encoder (B, h, w, C), flowfeat (B, H, W, d)
or None)` is traced into two compiled programs (`sequence_programs`), built once per (feature function, rows,
settings) and compiled once per (input size, annotation size, class bucket) for the whole run:
- `start(params, frame 0, first labels)`: features of frame 0, the KNN queues (first frame) and the linear probes
  fitted on it (500 Adam steps in one fori_loop), and the probes' labels of frame 0;
- `advance(params, carry, frames)`: a fixed chunk of `frames_per_call` frames (the last one padded by repeating its
  final frame): features, every KNN stream one frame at a time with its fixed-shape queue, the probes' prediction.
Both return only uint8 label maps at the annotation size; dense FlowFeat maps live only inside a chunk, so a
sequence of any length needs the memory of one chunk. Encoder features are computed once per frame and shared by
the `encoder` and `flowfeat` rows (and so is the encoder KNN stream of the two-stream protocol, see `knn`).

`evaluate_sequences` writes per row `out_dir/<kind>/<protocol>/<seq>/<frame>.png` (DAVIS palette), a few overlay
pictures in `.../overlays/`, and `SCORES.json` + `scores.csv` from the J&F scorer.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flowfeat_jax.eval import davis, jf, knn, linear_probe
from flowfeat_jax.eval.knn import KnnSettings
from flowfeat_jax.eval.linear_probe import ProbeSettings
from flowfeat_jax.progress import progress as progress_bar

PROTOCOLS = ("knn", "linear")
FEATURE_KINDS = ("encoder", "flowfeat")
FeatureFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array | None]]


def overlay(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colour of each object over an RGB frame (davis2017/utils.py overlay_semantic_mask)."""
    colours = davis.davis_palette()[labels]
    blended = (alpha * frame + (1 - alpha) * colours).astype(np.uint8)
    return np.where(labels[..., None] > 0, blended, frame)


def resize_frames(frames: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """(T, H0, W0, 3) uint8 frames resized with PIL bilinear to the network input size (DINO read_frame)."""
    return np.stack([np.asarray(Image.fromarray(frame).resize(input_hw[::-1], Image.BILINEAR)) for frame in frames])


def _check_rows(kinds: Sequence[str], protocols: Sequence[str]) -> None:
    for name, given, allowed in (("protocol", protocols, PROTOCOLS), ("feature kind", kinds, FEATURE_KINDS)):
        unknown = sorted(set(given) - set(allowed))
        if unknown or not given:
            raise ValueError(f"unknown or no {name}(s) {unknown or list(given)}; choose from {allowed}")


def _knn_rows(kinds: tuple[str, ...], settings: KnnSettings) -> dict[str, tuple[str, ...]]:
    """KNN streams averaged per row: encoder rows use the encoder stream, FlowFeat rows `settings.streams`."""
    flowfeat_streams = ("encoder", "flowfeat") if settings.streams == "both" else ("flowfeat",)
    return {kind: ("encoder",) if kind == "encoder" else flowfeat_streams for kind in kinds}


@functools.cache
def sequence_programs(feature_fn: FeatureFn, kinds: tuple[str, ...], protocols: tuple[str, ...],
                      knn_settings: KnnSettings, probe_settings: ProbeSettings) -> tuple[Callable, Callable]:
    """The jitted (start, advance) pair for these rows and settings (cached: one trace per input shape per run).

    start(params, frame0 (1, H, W, 3) uint8, labels: dict, num_valid, rows, cols; num_classes static)
      -> (carry, {"<kind>/linear": (1, H0, W0) uint8})
    advance(params, carry, frames (B, H, W, 3) uint8, num_valid, rows, cols)
      -> (carry, {"<kind>/<protocol>": (B, H0, W0) uint8})
    `labels` holds the first annotation resized (PIL nearest) to the KNN grid ("knn", (h', w')), the input size
    ("input", (H, W)) and the patch grid ("patch", (h, w)); rows, cols are knn.nearest_indices(input -> annotation).
    """
    _check_rows(kinds, protocols)
    knn_rows = _knn_rows(kinds, knn_settings) if "knn" in protocols else {}
    streams_used = sorted({stream for streams in knn_rows.values() for stream in streams})
    probe_kinds = kinds if "linear" in protocols else ()

    def features(params, frames):
        encoder, flowfeat = feature_fn(params, frames)
        return encoder, (flowfeat if "flowfeat" in kinds else None)

    def probe_inputs(kind, encoder, flowfeat, input_hw):
        """(FlowFeat or None, encoder, size the probe works at) of a row (linear_probe module docstring)."""
        if kind == "flowfeat":
            return flowfeat, encoder, input_hw
        return None, encoder, (input_hw if probe_settings.encoder_grid == "input" else encoder.shape[1:3])

    def start(params, frame0, labels, num_valid, rows, cols, *, num_classes):
        encoder, flowfeat = features(params, frame0)
        carry = {"queues": {}, "weights": {}}
        if knn_rows:
            streams = knn.knn_streams(encoder, flowfeat, knn_settings)
            first = jax.nn.one_hot(labels["knn"], num_classes)
            carry["queues"] = {name: knn.init_queue(streams[name][0], first, knn_settings.n_last_frames)
                               for name in streams_used}
        outputs = {}
        for kind in probe_kinds:
            probe_flowfeat, probe_encoder, hw = probe_inputs(kind, encoder, flowfeat, frame0.shape[1:3])
            fit_labels = labels["input"] if tuple(hw) == tuple(frame0.shape[1:3]) else labels["patch"]
            weights = linear_probe.fit_probe(
                None if probe_flowfeat is None else probe_flowfeat[0], probe_encoder[0], fit_labels, num_classes,
                jax.random.key(probe_settings.seed), num_valid=num_valid,
                steps=probe_settings.steps, learning_rate=probe_settings.learning_rate,
                weight_decay=probe_settings.weight_decay)
            carry["weights"][kind] = weights
            outputs[f"{kind}/linear"] = linear_probe.predict_labels(weights, probe_flowfeat, probe_encoder, hw,
                                                                    rows.shape + cols.shape, num_valid)
        return carry, outputs

    def advance(params, carry, frames, num_valid, rows, cols):
        encoder, flowfeat = features(params, frames)
        outputs = {}
        if knn_rows:
            streams = knn.knn_streams(encoder, flowfeat, knn_settings)
            grid_hw = streams["encoder"].shape[1:3]
            stride = frames.shape[1] // grid_hw[0]

            def one_frame(queues, targets):
                queues, soft = dict(queues), {}
                for name in streams_used:
                    queues[name], soft[name] = knn.propagate_frame(
                        queues[name], targets[name].reshape(-1, targets[name].shape[-1]), grid_hw,
                        topk=knn_settings.topk, temperature=knn_settings.temperature, radius=knn_settings.radius,
                        query_batch=knn_settings.query_batch)
                labels = {}
                for kind, names in knn_rows.items():
                    mean = sum(soft[name] for name in names) / len(names)  # supp. B.1: the soft maps averaged
                    labels[f"{kind}/knn"] = knn.soft_to_labels(mean.reshape(*grid_hw, -1), stride, rows, cols)
                return queues, labels

            targets = {name: streams[name] for name in streams_used}
            queues, knn_labels = jax.lax.scan(one_frame, carry["queues"], targets)
            carry = {**carry, "queues": queues}
            outputs.update(knn_labels)
        for kind in probe_kinds:
            probe_flowfeat, probe_encoder, hw = probe_inputs(kind, encoder, flowfeat, frames.shape[1:3])
            outputs[f"{kind}/linear"] = linear_probe.predict_labels(carry["weights"][kind], probe_flowfeat,
                                                                    probe_encoder, hw, rows.shape + cols.shape,
                                                                    num_valid)
        return carry, outputs

    return jax.jit(start, static_argnames=("num_classes",)), jax.jit(advance, donate_argnums=(1,))


def segment_sequence(feature_fn: FeatureFn, params: Any, frames: np.ndarray, first_annotation: np.ndarray,
                     patch_size: int, kinds: Sequence[str] = ("flowfeat",), protocols: Sequence[str] = PROTOCOLS, *,
                     knn_settings: KnnSettings = KnnSettings(), probe_settings: ProbeSettings = ProbeSettings(),
                     frames_per_call: int = 4, progress: bool = False) -> dict[str, np.ndarray]:
    """Predicted label maps (T, H0, W0) uint8 per row "<kind>/<protocol>" for one video.

    Args:
      feature_fn, params: the features (see the module docstring); `feature_fn` must be the same object across calls
        for the compiled programs to be reused.
      frames: (T, H, W, 3) uint8 frames already at the network input size (`resize_frames`), H and W multiples of
        `patch_size`.
      first_annotation: (H0, W0) uint8 labels of frame 0 at the annotation (output) size.
      patch_size: the encoder's patch size p (encoder grid = H/p x W/p).
      frames_per_call: frames per compiled chunk (a fixed shape: the last chunk is padded).
    """
    kinds, protocols = tuple(kinds), tuple(protocols)
    if frames_per_call < 1:
        raise ValueError(f"frames_per_call must be >= 1, got {frames_per_call}")
    start, advance = sequence_programs(feature_fn, kinds, protocols, knn_settings, probe_settings)
    input_hw, out_hw = frames.shape[1:3], first_annotation.shape
    if input_hw[0] % patch_size or input_hw[1] % patch_size:
        raise ValueError(f"input {input_hw[0]}x{input_hw[1]} is not a multiple of the patch size {patch_size}")
    patch_hw = (input_hw[0] // patch_size, input_hw[1] // patch_size)
    knn_settings.grid_stride(patch_size)  # a clear error for scale 2 with an odd patch
    labels = {name: jnp.asarray(knn.resize_labels_nearest(first_annotation, hw)) for name, hw in (
        ("knn", (patch_hw[0] * knn_settings.scale, patch_hw[1] * knn_settings.scale)), ("input", input_hw),
        ("patch", patch_hw))}
    num_valid = int(first_annotation.max()) + 1
    rows, cols = knn.nearest_indices(tuple(input_hw), tuple(out_hw))
    carry, first = start(params, frames[:1], labels, num_valid, rows, cols,
                         num_classes=linear_probe.class_bucket(num_valid))
    outputs = {name: [np.asarray(value)] for name, value in first.items()}
    if "knn" in protocols:
        outputs.update({f"{kind}/knn": [np.asarray(first_annotation, np.uint8)[None]] for kind in kinds})
    rest = frames[1:]
    bar = progress_bar(total=len(rest), desc="frames", unit="frame", leave=False, disable=not progress)
    for begin in range(0, len(rest), frames_per_call):
        chunk = rest[begin: begin + frames_per_call]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], frames_per_call - len(chunk), axis=0)])
        carry, predicted = advance(params, carry, padded, num_valid, rows, cols)
        for name, value in predicted.items():
            outputs[name].append(np.asarray(value)[: len(chunk)])  # only uint8 maps come back to the host
        bar.update(len(chunk))
    bar.close()
    return {name: np.concatenate(values) for name, values in outputs.items()}


def evaluate_sequences(feature_fn: FeatureFn, params: Any, davis_root: str | pathlib.Path,
                       sequences: Sequence[str] | None, out_dir: str | pathlib.Path, *, patch_size: int,
                       kinds: Sequence[str] = ("flowfeat",), protocols: Sequence[str] | str = PROTOCOLS,
                       split: str = "val", max_frames: int | None = None, input_multiple: int = 64,
                       short_side: int = 480, overlay_frames: int = 3,
                       **segment_kwargs) -> dict[str, dict[str, dict]]:
    """Segment, write and score DAVIS sequences; returns {kind: {protocol: {"objects": ..., "global": ...}}}.

    Frames are resized to `davis.davis_input_size(..., input_multiple, short_side)`. `max_frames` truncates every
    sequence (smoke runs; the scores then cover those frames only). `segment_kwargs` go to `segment_sequence`.
    """
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    kinds = tuple(kinds)
    _check_rows(kinds, protocols)
    sequences = list(sequences) if sequences else davis.list_sequences(davis_root, split)
    out_dir = pathlib.Path(out_dir)
    for sequence in progress_bar(sequences, desc="DAVIS sequences"):
        frames = davis.read_frames(davis_root, sequence, max_frames=max_frames)
        annotations, frame_ids = davis.read_annotations(davis_root, sequence, max_frames=max_frames)
        if len(frames) != len(annotations):
            raise ValueError(f"{sequence}: {len(frames)} frames but {len(annotations)} annotations")
        input_hw = davis.davis_input_size(*frames.shape[1:3], multiple=input_multiple, short_side=short_side)
        predictions = segment_sequence(feature_fn, params, resize_frames(frames, input_hw), annotations[0],
                                       patch_size, kinds, protocols, progress=True, **segment_kwargs)
        picks = np.unique(np.linspace(0, len(frames) - 1, overlay_frames).round().astype(int))
        for row, labels in predictions.items():
            for frame_id, label in zip(frame_ids, labels):
                davis.write_index_png(out_dir / row / sequence / f"{frame_id}.png", label)
            (out_dir / row / "overlays").mkdir(parents=True, exist_ok=True)
            for index in picks:
                picture = np.concatenate([overlay(frames[index], annotations[index]),
                                          overlay(frames[index], labels[index])], axis=1)  # ground truth | prediction
                Image.fromarray(picture).save(out_dir / row / "overlays" / f"{sequence}_{frame_ids[index]}.png")
    results = {}
    for kind in kinds:
        for protocol in protocols:
            row_dir = out_dir / kind / protocol
            scores = jf.score_results(davis_root, row_dir, sequences, max_frames=max_frames)
            (row_dir / "SCORES.json").write_text(json.dumps(scores, indent=2))
            jf.write_csv(scores, row_dir / "scores.csv")
            print(f"[{kind} {protocol}]\n{jf.format_table(scores)}")
            results.setdefault(kind, {})[protocol] = scores
    return results
