"""KNN label propagation: DINO's label_propagation transcribed in numpy, synthetic perfect features, real DAVIS."""

import json

import numpy as np
import pytest

from flowfeat_jax.eval import davis, jf, knn


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
    pooled = np.asarray(knn.pool_features(frames.astype(np.float32) / 255, stride))
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


def test_evaluate_sequences_both_protocols(davis_root, tmp_path):
    from flowfeat_jax.eval import vos

    rng = np.random.default_rng(0)
    projection, phase = 3 * rng.standard_normal((5, 16)), rng.uniform(0, 2 * np.pi, 16)
    calls = []

    def feature_fn(frames):  # cheap stand-in for FlowFeat: colour + position features
        calls.append(frames.shape)
        rgb = frames.astype(np.float32) / 255
        t_count, h, w, _ = rgb.shape
        yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        dense = np.concatenate([rgb, np.broadcast_to(np.stack([yy, xx], -1), (t_count, h, w, 2))], -1)
        return {"encoder": np.asarray(knn.pool_features(dense, 16)),
                "flowfeat": np.cos(dense @ projection + phase).astype(np.float32)}

    scores = vos.evaluate_sequences(feature_fn, davis_root, ["blackswan"], ("knn", "linear"), tmp_path,
                                    max_frames=5, overlay_frames=2, input_multiple=32, short_side=240,
                                    frames_per_call=2, probe_kwargs={"steps": 300})
    assert calls == [(2, 240, 416, 3), (2, 240, 416, 3), (1, 240, 416, 3)]
    for protocol in ("knn", "linear"):
        stats = scores[protocol]["objects"]["blackswan_1"]
        assert 0.3 < stats["J_mean"] <= 1 and 0 <= stats["F_mean"] <= 1
        assert len(list((tmp_path / protocol / "blackswan").glob("*.png"))) == 5
        assert len(list((tmp_path / protocol / "overlays").glob("*.png"))) == 2
        saved = json.loads((tmp_path / protocol / "SCORES.json").read_text())
        assert saved["global"]["JF_mean"] == pytest.approx(scores[protocol]["global"]["JF_mean"])
