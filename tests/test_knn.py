"""KNN label propagation: DINO's label_propagation transcribed in numpy, the two-stream FlowFeat protocol (supp. B.1)
against a numpy reference, one compilation for every sequence length, synthetic perfect features, real DAVIS."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flowfeat_jax.eval import davis, jf, knn, vos
from flowfeat_jax.eval.knn import KnnSettings
from flowfeat_jax.eval.linear_probe import ProbeSettings


def _dino_reference(features, first_labels, n_last, topk, radius, temperature=0.1):
    """DINO eval_video_segmentation.py, plainly in numpy: dense masked exp affinities, top-k threshold, normalise."""
    t_count, h, w, _ = features.shape
    n = h * w
    feats = features.reshape(t_count, n, -1)
    feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    mask = np.zeros((h, w, h, w))
    for i in range(h):
        for j in range(w):
            mask[i, j, max(i - radius, 0): i + radius + 1, max(j - radius, 0): j + radius + 1] = 1
    mask = mask.reshape(n, n)
    first = first_labels.reshape(n, -1)
    queue, outputs = [], [first]
    for t in range(1, t_count):
        sources = [feats[0]] + [f for f, _ in queue]
        segs = [first] + [s for _, s in queue]
        aff = np.stack([np.exp(feats[t] @ src.T / temperature) * mask for src in sources])  # (ctx, q, s)
        aff = aff.transpose(0, 2, 1).reshape(-1, n)  # (ctx * s, q)
        kth = np.sort(aff, axis=0)[-topk]
        aff = np.where(aff < kth, 0, aff)
        aff = aff / aff.sum(axis=0, keepdims=True)
        seg = np.concatenate(segs).T @ aff  # (K, q)
        if len(queue) == n_last:
            queue.pop(0)
        queue.append((feats[t], seg.T))
        outputs.append(seg.T)
    return np.stack(outputs).reshape(t_count, h, w, -1)


def test_matches_dino_transcription():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((7, 6, 7, 8)).astype(np.float32)
    first = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (6, 7))]
    expected = _dino_reference(features.astype(np.float64), first, n_last=3, topk=4, radius=2)
    got = knn.propagate(features, first, n_last_frames=3, topk=4, radius=2, query_batch=16)  # 42 = 2·16 + 10
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    unrestricted = knn.propagate(features, first, n_last_frames=3, topk=4, radius=None)
    assert not np.allclose(np.asarray(unrestricted), expected, atol=1e-3)  # the neighbourhood mask matters


def test_one_hot_features_propagate_perfectly():
    t_count, h, w, k = 10, 12, 16, 3
    labels = np.zeros((t_count, h, w), np.int64)
    for t in range(t_count):  # two objects that move one cell per frame
        labels[t, 2:7, 1 + t // 2: 6 + t // 2] = 1
        labels[t, 7:11, 10 - t // 3: 15 - t // 3] = 2
    one_hot = np.eye(k, dtype=np.float32)[labels]
    soft = knn.propagate(one_hot, one_hot[0], radius=3)
    np.testing.assert_array_equal(np.asarray(soft), one_hot)

    annotation = np.kron(labels[0], np.ones((4, 4), np.int64)).astype(np.uint8)  # a 48 x 64 "image"
    predicted = knn.knn_segment(one_hot, annotation, input_hw=(48, 64), radius=3)
    truth = np.stack([np.kron(frame, np.ones((4, 4), np.int64)) for frame in labels])
    assert predicted.shape == truth.shape and (predicted[0] == annotation).all()
    assert (predicted == truth).mean() > 0.98  # only half-cell shifts at boundaries from bilinear upsampling


def test_bad_grid_raises():
    with pytest.raises(ValueError, match="does not tile"):
        knn.knn_segment(np.zeros((2, 5, 7, 3), np.float32), np.zeros((40, 56), np.uint8), input_hw=(40, 50))


def _rgb_position_features(frames, stride):
    """Cheap features: stride-pooled RGB plus scaled (y, x) position."""
    t_count, height, width, _ = frames.shape
    pooled = np.asarray(knn.pool_to_grid(frames.astype(np.float32) / 255, (height // stride, width // stride)))
    t_count, h, w, _ = pooled.shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    position = np.broadcast_to(np.stack([yy, xx], -1), (t_count, h, w, 2))
    return np.concatenate([pooled, 0.5 * position], -1).astype(np.float32)


@pytest.mark.parametrize("sequence", ["blackswan", "car-shadow"])
def test_real_sequences_end_to_end(davis_root, sequence):
    frames = davis.read_frames(davis_root, sequence, max_frames=6)
    annotations, _ = davis.read_annotations(davis_root, sequence, max_frames=6)
    input_hw = davis.davis_input_size(*frames.shape[1:3])
    assert input_hw == (480, 832)
    resized = np.stack([np.asarray(knn.Image.fromarray(f).resize(input_hw[::-1], knn.Image.BILINEAR)) for f in frames])
    features = _rgb_position_features(resized, stride=16)  # the patch-16 grid, 30 x 52
    predicted = knn.knn_segment(features, annotations[0], input_hw)
    assert predicted.shape == annotations.shape and predicted.dtype == np.uint8
    stats = jf.score_sequence(sequence, annotations, predicted)[f"{sequence}_1"]
    assert 0 <= stats["F_mean"] <= 1 and 0.3 < stats["J_mean"] <= 1  # colour + position tracks these objects


def _bilinear_numpy(x, factor):
    """(h, w, K) upsampled by an integer factor, bilinear with align_corners=False (torch F.interpolate), in numpy."""
    h, w, _ = x.shape

    def taps(n):
        source = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, n - 1), source - low

    (r0, r1, fr), (c0, c1, fc) = taps(h), taps(w)
    rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def _dino_output_numpy(soft, stride, out_hw):
    """DINO's output path in numpy: bilinear x stride, norm_mask (per-class min-max), arg-max, PIL nearest."""
    up = _bilinear_numpy(soft, stride)
    low, high = up.min(axis=(0, 1)), up.max(axis=(0, 1))
    up = np.where(high > 0, (up - low) / np.where(high - low > 0, high - low, 1), up)
    labels = up.argmax(-1).astype(np.uint8)
    return np.asarray(Image.fromarray(labels).resize(out_hw[::-1], Image.NEAREST))


def _indexed_feature_fn(params, frames):
    """Precomputed features picked by the frame index each test frame carries as its pixel value (traceable)."""
    index = frames[:, 0, 0, 0].astype(jnp.int32)
    return params["encoder"][index], params["flowfeat"][index]


def _indexed_frames(t_count, hw):
    return np.broadcast_to(np.arange(t_count, dtype=np.uint8)[:, None, None, None], (t_count, *hw, 3)).copy()


@pytest.mark.parametrize("scale, streams", [(1, "both"), (2, "both"), (1, "flowfeat")])
def test_two_stream_protocol_matches_numpy_reference(scale, streams):
    rng = np.random.default_rng(scale)
    t_count, patch, h, w, channels, dim = 6, 4, 5, 6, 6, 4
    encoder = rng.standard_normal((t_count, h, w, channels)).astype(np.float32)
    flowfeat = rng.standard_normal((t_count, h * patch, w * patch, dim)).astype(np.float32)
    annotation = np.kron(rng.integers(0, 3, (h, w)), np.ones((patch, patch), int)).astype(np.uint8)
    annotation = np.asarray(Image.fromarray(annotation).resize((w * patch + 3, h * patch + 2), Image.NEAREST))
    settings = KnnSettings(n_last_frames=3, topk=4, radius=2, scale=scale, streams=streams, query_batch=7)
    got = vos.segment_sequence(_indexed_feature_fn, {"encoder": encoder, "flowfeat": flowfeat},
                               _indexed_frames(t_count, (h * patch, w * patch)), annotation, patch,
                               ("encoder", "flowfeat"), ("knn",), knn_settings=settings, frames_per_call=4)

    stride = patch // scale  # the numpy reference: each stream on its own grid, DINO run per stream, maps averaged
    grid = (h * scale, w * scale)
    pooled = flowfeat.reshape(t_count, grid[0], stride, grid[1], stride, dim).mean(axis=(2, 4))
    encoder_grid = np.stack([_bilinear_numpy(frame, scale) for frame in encoder])
    first = np.eye(3)[np.asarray(Image.fromarray(annotation).resize(grid[::-1], Image.NEAREST))]
    soft = {name: _dino_reference(features.astype(np.float64), first, n_last=3, topk=4, radius=2)
            for name, features in (("encoder", encoder_grid), ("flowfeat", pooled))}
    rows = {"encoder": soft["encoder"],
            "flowfeat": (soft["encoder"] + soft["flowfeat"]) / 2 if streams == "both" else soft["flowfeat"]}
    for kind, row in rows.items():
        expected = np.stack([annotation] + [_dino_output_numpy(frame, stride, annotation.shape) for frame in row[1:]])
        np.testing.assert_array_equal(got[f"{kind}/knn"], expected, err_msg=kind)
    assert not np.array_equal(_dino_output_numpy(soft["encoder"][3], stride, annotation.shape),
                              _dino_output_numpy(soft["flowfeat"][3], stride, annotation.shape))  # streams differ


def test_nearest_indices_are_pil_nearest():
    labels = np.random.default_rng(0).integers(0, 7, (476, 840)).astype(np.uint8)
    for out_hw in ((480, 854), (480, 832), (34, 60)):
        rows, cols = knn.nearest_indices((476, 840), out_hw)
        np.testing.assert_array_equal(labels[rows][:, cols], knn.resize_labels_nearest(labels, out_hw))


class _CompileCounter:
    """Counts XLA backend compilations while active (jax.monitoring has no way to unregister a listener)."""

    active, count = False, 0

    @classmethod
    def listen(cls, name, _duration, **_):
        if cls.active and name == "/jax/core/compile/backend_compile_duration":
            cls.count += 1


jax.monitoring.register_event_duration_secs_listener(_CompileCounter.listen)


@pytest.mark.slow
def test_compiled_once_for_every_sequence_length():
    rng = np.random.default_rng(0)
    patch, h, w = 4, 4, 6
    params = {"encoder": rng.standard_normal((11, h, w, 5)).astype(np.float32),
              "flowfeat": rng.standard_normal((11, h * patch, w * patch, 3)).astype(np.float32)}
    annotations = [np.kron(rng.integers(0, k, (h, w)), np.ones((patch, patch), int)).astype(np.uint8) for k in (3, 4)]
    kwargs = {"knn_settings": KnnSettings(radius=2), "probe_settings": ProbeSettings(steps=3), "frames_per_call": 3}
    rows = ("encoder", "flowfeat")
    vos.segment_sequence(_indexed_feature_fn, params, _indexed_frames(5, (h * patch, w * patch)), annotations[0],
                         patch, rows, vos.PROTOCOLS, **kwargs)  # the first sequence compiles
    _CompileCounter.active, _CompileCounter.count = True, 0
    try:
        out = vos.segment_sequence(_indexed_feature_fn, params, _indexed_frames(11, (h * patch, w * patch)),
                                   annotations[1], patch, rows, vos.PROTOCOLS, **kwargs)  # longer, 4 classes not 3
    finally:
        _CompileCounter.active = False
    assert _CompileCounter.count == 0, f"{_CompileCounter.count} compilation(s) for a second sequence"
    assert {name: labels.shape for name, labels in out.items()} == {f"{k}/{p}": (11, 16, 24) for k in rows
                                                                    for p in vos.PROTOCOLS}


@pytest.mark.parametrize("patch, input_hw", [(14, (476, 840)), (16, (480, 832))])
@pytest.mark.slow
def test_davis_frame_sizes_every_patch(patch, input_hw):
    """The paper's input sizes run end to end (no pooling-stride crash), at both KNN scales."""
    grid = (input_hw[0] // patch, input_hw[1] // patch)
    rng = np.random.default_rng(patch)

    def feature_fn(_, frames):  # encoder: colour on the patch grid; FlowFeat: colour + position at the input size
        rgb = frames.astype(jnp.float32) / 255
        yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, input_hw[0]), jnp.linspace(-1, 1, input_hw[1]), indexing="ij")
        position = jnp.broadcast_to(jnp.stack([yy, xx], -1), (*rgb.shape[:3], 2))
        return knn.pool_to_grid(rgb, grid), jnp.concatenate([rgb, position], -1)

    frames = rng.integers(0, 255, (3, *input_hw, 3)).astype(np.uint8)
    annotation = np.zeros((480, 854), np.uint8)
    annotation[100:300, 200:500] = 1
    for scale in (1, 2):
        out = vos.segment_sequence(feature_fn, None, frames, annotation, patch, ("encoder", "flowfeat"),
                                   vos.PROTOCOLS, knn_settings=KnnSettings(scale=scale),
                                   probe_settings=ProbeSettings(steps=2), frames_per_call=2)
        assert {name: labels.shape for name, labels in out.items()} == {
            f"{k}/{p}": (3, 480, 854) for k in ("encoder", "flowfeat") for p in vos.PROTOCOLS}


def test_bad_knn_settings_raise():
    with pytest.raises(ValueError, match="knn streams"):
        KnnSettings(streams="encoder+flowfeat")
    with pytest.raises(ValueError, match="patch size divisible"):
        KnnSettings(scale=2).grid_stride(15)


@pytest.mark.slow
def test_evaluate_sequences_both_protocols(davis_root, tmp_path):
    rng = np.random.default_rng(0)
    projection, phase = 3 * rng.standard_normal((5, 16)), rng.uniform(0, 2 * np.pi, 16)
    calls = []

    def feature_fn(_, frames):  # cheap stand-in for FlowFeat: colour + position features
        calls.append(frames.shape)  # at trace time: one trace per program
        rgb = frames.astype(jnp.float32) / 255
        t_count, h, w, _ = rgb.shape
        yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
        dense = jnp.concatenate([rgb, jnp.broadcast_to(jnp.stack([yy, xx], -1), (t_count, h, w, 2))], -1)
        fourier = jnp.cos(dense @ projection + phase)
        return knn.pool_to_grid(fourier, (h // 16, w // 16)), fourier

    scores = vos.evaluate_sequences(feature_fn, None, davis_root, ["blackswan", "dog"], tmp_path, patch_size=16,
                                    kinds=("encoder", "flowfeat"), protocols=("knn", "linear"), max_frames=5,
                                    overlay_frames=2, input_multiple=32, short_side=240, frames_per_call=2,
                                    probe_settings=ProbeSettings(steps=300))
    assert calls == [(1, 240, 416, 3), (2, 240, 416, 3)]  # start and advance, traced once for both sequences
    for kind in ("encoder", "flowfeat"):
        for protocol in ("knn", "linear"):
            stats = scores[kind][protocol]["objects"]["blackswan_1"]
            assert 0.3 < stats["J_mean"] <= 1 and 0 <= stats["F_mean"] <= 1, (kind, protocol)
            assert len(list((tmp_path / kind / protocol / "blackswan").glob("*.png"))) == 5
            assert len(list((tmp_path / kind / protocol / "overlays").glob("*.png"))) == 4
            saved = json.loads((tmp_path / kind / protocol / "SCORES.json").read_text())
            assert saved["global"]["JF_mean"] == pytest.approx(scores[kind][protocol]["global"]["JF_mean"])
