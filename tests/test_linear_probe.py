"""Linear probe: torch Adam(weight_decay) parity (factorised logits, padded classes), input sizes, the encoder probe on
the patch grid, separable synthetic data and real DAVIS frames."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowfeat_jax.eval import davis, jf, knn, linear_probe, vos
from flowfeat_jax.eval.linear_probe import ProbeSettings


def test_davis_input_size():
    assert linear_probe.davis_input_size(480, 854) == (480, 832)  # DINO read_frame: floor(854 / 64) * 64
    assert linear_probe.davis_input_size(854, 480) == (832, 480)
    assert linear_probe.davis_input_size(1080, 1920) == (480, 832)
    assert linear_probe.davis_input_size(480, 854, multiple=56, short_side=476) == (476, 840)  # patch 14
    with pytest.raises(ValueError, match="too narrow"):
        linear_probe.davis_input_size(100, 90, multiple=64, short_side=50)


@pytest.mark.slow
def test_fit_matches_torch_adam_with_weight_decay():
    """[F, E] @ W on concatenated features in torch = F W_F + E W_E in the factorised fit; a 4th, padded class (3
    present) changes nothing for the 3 real ones."""
    rng = np.random.default_rng(0)
    flowfeat = rng.standard_normal((6, 5, 4)).astype(np.float32)
    encoder = rng.standard_normal((6, 5, 3)).astype(np.float32)  # on the label grid: no resize
    labels = rng.integers(0, 3, (6, 5))
    key = jax.random.key(3)
    steps = 40
    fit = jax.jit(linear_probe.fit_probe, static_argnums=(3,), static_argnames=("steps",))
    initial = np.asarray(fit(flowfeat, encoder, labels, 4, key, num_valid=3, steps=0))
    assert initial.shape == (8, 4) and np.abs(initial).max() <= 1 / np.sqrt(7)
    got = np.asarray(fit(flowfeat, encoder, labels, 4, key, num_valid=3, steps=steps))

    weight = torch.nn.Parameter(torch.from_numpy(initial[:-1, :3].copy()))
    bias = torch.nn.Parameter(torch.from_numpy(initial[-1, :3].copy()))
    optim = torch.optim.Adam([weight, bias], lr=5e-3, weight_decay=5e-4)
    x = torch.from_numpy(np.concatenate([flowfeat, encoder], -1).reshape(-1, 7))
    y = torch.from_numpy(labels.reshape(-1))
    for _ in range(steps):
        optim.zero_grad()
        torch.nn.functional.cross_entropy(x @ weight + bias, y).backward()
        optim.step()
    expected = torch.cat([weight, bias[None]]).detach().numpy()
    np.testing.assert_allclose(got[:, :3], expected, atol=1e-5)
    assert np.abs(got - initial).max() > 0.1  # it did train
    predicted = linear_probe.predict_labels(got, flowfeat[None], encoder[None], (6, 5), (6, 5), num_valid=3)
    assert np.asarray(predicted).max() < 3  # the padded class is never predicted


def test_factorised_logits_equal_upsampled_concatenation():
    """F W_F + R(E W_E) + b == [F, R(E)] W + b: bilinear resizing commutes with the projection."""
    rng = np.random.default_rng(2)
    flowfeat = rng.standard_normal((2, 12, 18, 4)).astype(np.float32)
    encoder = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    weights = rng.standard_normal((10, 3)).astype(np.float32)
    upsampled = jax.image.resize(encoder, (2, 12, 18, 5), method="linear")
    expected = np.concatenate([flowfeat, upsampled], -1) @ weights[:-1] + weights[-1]
    got = linear_probe.probe_logits(weights, flowfeat, encoder, (12, 18))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_class_bucket():
    assert [linear_probe.class_bucket(k) for k in (1, 2, 3, 4, 5, 8, 9)] == [2, 2, 4, 4, 8, 8, 16]


@pytest.mark.slow
def test_separable_features_segment_every_frame():
    rng = np.random.default_rng(1)
    t_count, h, w = 4, 16, 24
    labels = np.zeros((t_count, h, w), np.uint8)
    for t in range(t_count):
        labels[t, 3:9, 2 + 2 * t: 10 + 2 * t] = 1
        labels[t, 10:15, 14 - t: 22 - t] = 2
    flowfeat = np.eye(3, dtype=np.float32)[labels] + 0.1 * rng.standard_normal((t_count, h, w, 3)).astype(np.float32)
    encoder = np.zeros((t_count, h // 8, w // 8, 5), np.float32)  # uninformative
    predicted = linear_probe.linear_probe_segment(flowfeat, encoder, labels[0], (h, w))
    np.testing.assert_array_equal(predicted, labels)
    # Encoder-only probing at the input size: the informative features now come in as the "encoder" grid.
    input_grid = ProbeSettings(encoder_grid="input")
    predicted = linear_probe.linear_probe_segment(None, flowfeat, labels[0], (h, w), input_grid)
    np.testing.assert_array_equal(predicted, labels)


@pytest.mark.slow
def test_encoder_probe_fits_on_the_patch_grid():
    """Paper: the encoder-only probe at its native resolution: labels downsampled to the patch grid, masks resized
    to the original frame. Patch-block labels with one-hot patch features are recovered exactly; fitting at the
    input size instead sees other (blurred) features, and the sequence programs give the same maps."""
    rng = np.random.default_rng(4)
    t_count, patch, h, w = 3, 8, 4, 6
    grid_labels = rng.integers(0, 3, (t_count, h, w))
    encoder = np.eye(3, dtype=np.float32)[grid_labels] + 0.05 * rng.standard_normal((t_count, h, w, 3)).astype(
        np.float32)
    truth = np.stack([np.kron(g, np.ones((patch, patch), int)) for g in grid_labels]).astype(np.uint8)
    annotation = truth[0]
    weights, grid = linear_probe.fit_first_frame(None, encoder[0], annotation, (h * patch, w * patch))
    assert grid == (h, w) and weights.shape == (4, 4)  # C + 1 rows, K = 3 padded to 4
    predicted = linear_probe.linear_probe_segment(None, encoder, annotation, (h * patch, w * patch))
    assert predicted.shape == truth.shape
    assert (predicted == truth).mean() > 0.9  # bilinear logits blur only the patch borders
    _, grid = linear_probe.fit_first_frame(None, encoder[0], annotation, (h * patch, w * patch),
                                           ProbeSettings(encoder_grid="input"))
    assert grid == (h * patch, w * patch)

    def feature_fn(params, frames):
        return params[frames[:, 0, 0, 0].astype(jnp.int32)], None

    frames = np.broadcast_to(np.arange(t_count, dtype=np.uint8)[:, None, None, None],
                             (t_count, h * patch, w * patch, 3)).copy()
    out = vos.segment_sequence(feature_fn, encoder, frames, annotation, patch, ("encoder",), ("linear",),
                               frames_per_call=2)
    np.testing.assert_array_equal(out["encoder/linear"], predicted)


def test_wrong_flowfeat_size_raises():
    with pytest.raises(ValueError, match="expected the input size 32x48"):
        linear_probe.probe_logits(np.zeros((10, 2)), np.zeros((1, 30, 48, 4)), np.zeros((1, 2, 3, 5)), (32, 48))


@pytest.mark.parametrize("sequence", ["dog", "car-shadow"])
@pytest.mark.slow
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
    encoder = np.asarray(knn.pool_to_grid(rgb, (input_hw[0] // 16, input_hw[1] // 16)))  # a coarse "patch" grid
    predicted = linear_probe.linear_probe_segment(flowfeat.astype(np.float32), encoder, annotations[0], input_hw)
    assert predicted.shape == annotations.shape and predicted.dtype == np.uint8
    stats = jf.score_sequence(sequence, annotations, predicted)[f"{sequence}_1"]
    assert 0 <= stats["F_mean"] <= 1 and 0.5 < stats["J_mean"] <= 1
