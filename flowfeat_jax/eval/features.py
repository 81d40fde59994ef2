"""DAVIS evaluation of a FlowFeat model: feature functions, the run over sequences and feature kinds, pictures."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import flax.nnx as nnx
import jax
import numpy as np

from flowfeat_jax import viz
from flowfeat_jax.eval import davis, vos
from flowfeat_jax.eval.knn import KnnSettings
from flowfeat_jax.eval.linear_probe import ProbeSettings
from flowfeat_jax.eval.vos import FEATURE_KINDS
from flowfeat_jax.models.flowfeat import FlowFeat
from flowfeat_jax.models.vit import normalize_images


def davis_input_geometry(patch_size: int, short_side: int = 480) -> tuple[int, int]:
    """(multiple, short side) of the evaluation input for a patch size: both sides give an even token grid.

    Patch 16 keeps the paper's 480 x (multiple of 64); patch 14 uses 476 x (multiple of 56).
    """
    grid_multiple = 2 * patch_size
    multiple = 64 if 64 % grid_multiple == 0 else 2 * grid_multiple
    return multiple, short_side // grid_multiple * grid_multiple


_FEATURE_FNS: dict = {}  # (model config, with_decoder) -> (feature_fn, its jitted host form)


def model_feature_fns(model: FlowFeat, with_decoder: bool = True) -> tuple[vos.FeatureFn, Callable]:
    """`feature_fn(state, frames uint8 (B, H, W, 3)) -> (encoder (B, h, w, C), flowfeat (B, H, W, d) or None)` and
    its `jax.jit`, for models of this architecture.

    Kept per model config (its graph; `nnx.GraphDef` itself is unhashable when a layer stores a list), so every
    sequence, row, model of the same architecture and validation round reuses one compiled program.
    `with_decoder=False` skips the decoder (encoder-only rows).
    """
    key = (model.cfg, with_decoder)
    if key not in _FEATURE_FNS:
        graphdef = nnx.graphdef(model)

        def feature_fn(state, frames):
            merged = nnx.merge(graphdef, state)
            images = normalize_images(frames)
            if not with_decoder:
                return merged.encode(images).final, None
            return merged(images)

        _FEATURE_FNS[key] = (feature_fn, jax.jit(feature_fn))
    return _FEATURE_FNS[key]


def make_feature_fn(model: FlowFeat, kind: str = "flowfeat") -> Callable[[np.ndarray], dict]:
    """`feature_fn(frames uint8 (B, H, W, 3)) -> {"encoder": (B, h, w, C), "flowfeat": (B, H, W, d) or None}` on the
    host, for pictures and feature dumps (one jit per model graph, not per call).

    kind "encoder" skips the decoder (encoder-feature baselines); "flowfeat" returns both.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
    state = nnx.state(model)
    _, features = model_feature_fns(model, kind == "flowfeat")

    def feature_fn(frames: np.ndarray) -> dict:
        encoder, flowfeat = features(state, frames)
        return {"encoder": np.asarray(encoder), "flowfeat": None if flowfeat is None else np.asarray(flowfeat)}

    return feature_fn


def feature_picture(model: FlowFeat, frame: np.ndarray, path: str | pathlib.Path, input_hw: tuple[int, int]) -> None:
    """One PNG: the frame | PCA of encoder features | PCA of FlowFeat features, all at the input size."""
    resized = vos.resize_frames(frame[None], input_hw)[0]
    features = make_feature_fn(model, "flowfeat")(resized[None])
    encoder_rgb = viz.pca_image(features["encoder"][0])
    scale = input_hw[0] // encoder_rgb.shape[0]
    encoder_rgb = encoder_rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    flowfeat_rgb = viz.pca_image(features["flowfeat"][0])
    viz.save_png(path, np.concatenate([resized, encoder_rgb, flowfeat_rgb], axis=1))


def evaluate_davis(
    model: FlowFeat,
    davis_root: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    split: str = "val",
    sequences: Sequence[str] | None = None,
    protocols: Sequence[str] = ("knn",),
    feature_kinds: Sequence[str] = ("flowfeat",),
    short_side: int = 480,
    max_frames: int | None = None,
    knn_settings: KnnSettings = KnnSettings(),
    probe_settings: ProbeSettings = ProbeSettings(),
    frames_per_call: int | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Scores every feature kind under every protocol; returns {kind: {protocol: global J&F scores}}.

    All rows share one pass over each sequence (`vos.segment_sequence`: encoder features computed once per frame).
    Writes `out_dir/<kind>/<protocol>/` (result PNGs, overlays, SCORES.json, scores.csv via `vos`) and one PCA
    picture per sequence, `out_dir/pca/<sequence>.png` (frame | encoder | FlowFeat).
    `frames_per_call` None: 1 on CPU (DINOv2-S/14 at 476 x 840 on 2 cores: 1.61 s/frame at batch 1, 2.54 s/frame at
    batch 4), 4 on accelerators.
    """
    if frames_per_call is None:
        frames_per_call = 1 if jax.default_backend() == "cpu" else 4
    out_dir = pathlib.Path(out_dir)
    patch_size = model.cfg.encoder.patch_size
    multiple, short_side = davis_input_geometry(patch_size, short_side)
    sequences = list(sequences) if sequences else davis.list_sequences(davis_root, split)
    scores = vos.evaluate_sequences(
        model_feature_fns(model, "flowfeat" in feature_kinds)[0],
        nnx.state(model),
        davis_root,
        sequences,
        out_dir,
        patch_size=patch_size,
        kinds=tuple(feature_kinds),
        protocols=tuple(protocols),
        split=split,
        max_frames=max_frames,
        input_multiple=multiple,
        short_side=short_side,
        knn_settings=knn_settings,
        probe_settings=probe_settings,
        frames_per_call=frames_per_call,
    )
    results = {kind: {protocol: score["global"] for protocol, score in by_protocol.items()}
               for kind, by_protocol in scores.items()}
    for sequence in sequences:
        frame = davis.read_frames(davis_root, sequence, max_frames=1)[0]
        input_hw = davis.davis_input_size(*frame.shape[:2], multiple=multiple, short_side=short_side)
        feature_picture(model, frame, out_dir / "pca" / f"{sequence}.png", input_hw)
    return results


def results_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table: one row per (features, protocol) with J&F, J and F means."""
    lines = ["| features | protocol | J&F | J | F |", "| --- | --- | --- | --- | --- |"]
    for kind, by_protocol in results.items():
        for protocol, scores in by_protocol.items():
            lines.append(
                f"| {kind} | {protocol} | {scores['JF_mean']:.4f} | {scores['J_mean']:.4f} | {scores['F_mean']:.4f} |"
            )
    return "\n".join(lines)
