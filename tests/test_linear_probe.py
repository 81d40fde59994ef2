"""Linear probe: torch Adam(weight_decay) parity, input sizes, separable synthetic data and real DAVIS frames."""

import jax
import numpy as np
import pytest
import torch

from flowfeat_jax.eval import davis, jf, knn, linear_probe


def test_davis_input_size():
    assert linear_probe.davis_input_size(480, 854) == (480, 832)  # DINO read_frame: floor(854 / 64) * 64
    assert linear_probe.davis_input_size(854, 480) == (832, 480)
    assert linear_probe.davis_input_size(1080, 1920) == (480, 832)
    assert linear_probe.davis_input_size(480, 854, multiple=56, short_side=476) == (476, 840)  # patch 14
    with pytest.raises(ValueError, match="too narrow"):
        linear_probe.davis_input_size(100, 90, multiple=64, short_side=50)


def test_fit_matches_torch_adam_with_weight_decay():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((6, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 3, (6, 5))
    key = jax.random.key(3)
    steps = 40
    initial = np.asarray(linear_probe.fit_probe(features, labels, 3, key, steps=0))
    assert np.abs(initial).max() <= 1 / np.sqrt(7)
    got = np.asarray(linear_probe.fit_probe(features, labels, 3, key, steps=steps))

    weight = torch.nn.Parameter(torch.from_numpy(initial[:-1].copy()))
    bias = torch.nn.Parameter(torch.from_numpy(initial[-1].copy()))
    optim = torch.optim.Adam([weight, bias], lr=5e-3, weight_decay=5e-4)
    x, y = torch.from_numpy(features.reshape(-1, 7)), torch.from_numpy(labels.reshape(-1))
    for _ in range(steps):
        optim.zero_grad()
        torch.nn.functional.cross_entropy(x @ weight + bias, y).backward()
        optim.step()
    expected = torch.cat([weight, bias[None]]).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - initial).max() > 0.1  # it did train


def test_separable_features_segment_every_frame():
    rng = np.random.default_rng(1)
    t_count, h, w = 4, 16, 24
    labels = np.zeros((t_count, h, w), np.uint8)
    for t in range(t_count):
        labels[t, 3:9, 2 + 2 * t: 10 + 2 * t] = 1
        labels[t, 10:15, 14 - t: 22 - t] = 2
    flowfeat = np.eye(3, dtype=np.float32)[labels] + 0.1 * rng.standard_normal((t_count, h, w, 3)).astype(np.float32)
    encoder = np.zeros((t_count, h // 8, w // 8, 5), np.float32)  # uninformative
    predicted = linear_probe.linear_probe_segment(flowfeat, encoder, labels[0], (h, w), batch_size=3)
    np.testing.assert_array_equal(predicted, labels)
    # Encoder-only probing (no FlowFeat): the informative features now come in as the "encoder" grid.
    predicted = linear_probe.linear_probe_segment(None, flowfeat, labels[0], (h, w), batch_size=3)
    np.testing.assert_array_equal(predicted, labels)


def test_wrong_flowfeat_size_raises():
    with pytest.raises(ValueError, match="expected the input size 32x48"):
        linear_probe.probe_features(np.zeros((1, 30, 48, 4)), np.zeros((1, 2, 3, 5)), (32, 48))


@pytest.mark.parametrize("sequence", ["dog", "car-shadow"])
def test_real_sequences_end_to_end(davis_root, sequence):
    frames = davis.read_frames(davis_root, sequence, max_frames=4)
    annotations, _ = davis.read_annotations(davis_root, sequence, max_frames=4)
    input_hw = davis.davis_input_size(*frames.shape[1:3], multiple=32, short_side=240)  # half size keeps CPU time low
    resized = np.stack([np.asarray(knn.Image.fromarray(f).resize(input_hw[::-1], knn.Image.BILINEAR)) for f in frames])
    rgb = resized.astype(np.float32) / 255
    yy, xx = np.meshgrid(np.linspace(-1, 1, input_hw[0]), np.linspace(-1, 1, input_hw[1]), indexing="ij")
    colour_position = np.concatenate([rgb, np.broadcast_to(np.stack([yy, xx], -1), (*rgb.shape[:3], 2))], -1)
    rng = np.random.default_rng(0)  # cheap dense features: random Fourier features of colour and position
    flowfeat = np.cos(colour_position @ (3 * rng.standard_normal((5, 32))) + rng.uniform(0, 2 * np.pi, 32))
    encoder = np.asarray(knn.pool_features(rgb, 16))  # a coarse "patch" grid
    predicted = linear_probe.linear_probe_segment(flowfeat.astype(np.float32), encoder, annotations[0], input_hw)
    assert predicted.shape == annotations.shape and predicted.dtype == np.uint8
    stats = jf.score_sequence(sequence, annotations, predicted)[f"{sequence}_1"]
    assert 0 <= stats["F_mean"] <= 1 and 0.5 < stats["J_mean"] <= 1
