"""Dense probes: label mapping, metrics against hand-computed values, overfitting tiny synthetic sets, data sources
(folders, mocked tfds), bad inputs, and CLI smoke runs of both probe configs with a tiny random model."""

import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import TINY_MODEL, config_flags
from flax import nnx
from PIL import Image

from flowfeat_jax.config import load_config
from flowfeat_jax.probes import data as data_lib
from flowfeat_jax.probes import depth as depth_lib
from flowfeat_jax.probes import run as run_lib
from flowfeat_jax.probes import segmentation as seg_lib
from flowfeat_jax.train import checkpoint as ckpt_lib
from flowfeat_jax.train import run_support


# --- COCO-Stuff-27 mapping --------------------------------------------------------------------------------------
def test_fine_to_coarse_follows_cocostuff_hierarchy():
    table = data_lib.fine_to_coarse_table()
    assert data_lib.NUM_FINE_CLASSES == 182 and data_lib.NUM_COARSE_CLASSES == 27
    names = [name for name, _ in data_lib.FINE_CLASSES]
    coarse = data_lib.COARSE_CLASSES
    # Spot checks: fine id = COCO-Stuff label id - 1.
    for fine_name, coarse_name in [("person", "person"), ("toothbrush", "indoor"), ("[hair brush]", "indoor"),
                                   ("banner", "textile"), ("clouds", "sky"), ("wood", "solid"), ("fog", "water"),
                                   ("light", "furniture-stuff"), ("playingfield", "ground"), ("salad", "food-stuff")]:
        assert coarse[table[names.index(fine_name)]] == coarse_name
    assert names.index("person") == 0 and names.index("toothbrush") == 89 and names.index("banner") == 91
    assert names.index("wood") == 181
    counts = np.bincount(table[:182], minlength=27)
    # Fine ids per coarse class (COCO-Stuff hierarchy; also what the PiCIE/STEGO fine_to_coarse dict gives).
    np.testing.assert_array_equal(counts, [6, 6, 10, 10, 8, 8, 8, 10, 6, 1, 10, 8, 2, 6, 4, 11, 4, 11, 7, 2, 6, 11, 9,
                                           2, 6, 5, 5])
    assert table[255] == 255 and table[200] == -1
    fine = np.array([[0, 91, 255], [181, 170, 2]], np.uint8)
    np.testing.assert_array_equal(data_lib.coarse_labels(fine), [[9, 17, 255], [24, 18, 11]])
    with pytest.raises(ValueError, match=r"bad.png: not COCO-Stuff fine class ids .*\[182, 200\]"):
        data_lib.coarse_labels(np.array([[182, 200, 3]], np.uint8), "bad.png")


# --- metrics ------------------------------------------------------------------------------------------------------
def test_segmentation_metrics_hand_computed():
    labels = jnp.array([[0, 0, 1], [1, 255, 2]])
    pred = jnp.array([[0, 1, 1], [1, 0, 0]])
    confusion = np.asarray(seg_lib.confusion_matrix(pred, labels, 4))
    np.testing.assert_array_equal(confusion[:3, :3], [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    scores = seg_lib.segmentation_scores(confusion)
    # IoU_0 = 1/(2+2-1), IoU_1 = 2/(2+3-2), IoU_2 = 0/1; class 3 never occurs (NaN, not averaged).
    np.testing.assert_allclose(scores["iou"][:3], [1 / 3, 2 / 3, 0.0])
    assert np.isnan(scores["iou"][3])
    assert scores["miou"] == pytest.approx(1 / 3) and scores["pixel_accuracy"] == pytest.approx(3 / 5)
    logits = jnp.log(jnp.array([[[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]]))
    ce = seg_lib.cross_entropy_ignore(logits, jnp.array([[[0, 255, 1]]]))
    assert float(ce) == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2, rel=1e-6)


def test_depth_metrics_hand_computed():
    gt, pred = np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.5, 7.6])  # ratios 1, 4/3, 1.9
    errors = depth_lib.depth_errors(gt, pred)
    assert errors["rmse"] == pytest.approx(np.sqrt((0 + 0.25 + 3.6**2) / 3))
    assert errors["abs_rel"] == pytest.approx((0 + 0.25 + 0.9) / 3)
    assert (errors["delta1"], errors["delta2"], errors["delta3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))

    # Invalid ground truth (0, NaN, beyond 10 m, outside the evaluation mask) is masked; NaN predictions -> min depth.
    gt_map = np.array([[1.0, 2.0, 4.0, 0.0], [np.nan, 12.0, 3.0, 5.0]])
    pred_map = np.array([[1.0, 1.5, 7.6, 9.0], [2.0, 2.0, np.nan, 1.0]])
    mask = np.array([[True, True, True, True], [True, True, True, False]])
    masked = depth_lib.image_depth_errors(pred_map, gt_map, mask)
    expected = depth_lib.depth_errors([1.0, 2.0, 4.0, 3.0], [1.0, 1.5, 7.6, 1e-3])
    assert masked == pytest.approx(expected)
    assert depth_lib.image_depth_errors(pred_map, np.zeros_like(gt_map), mask) is None
    with pytest.raises(ValueError, match="differ"):
        depth_lib.image_depth_errors(pred_map, gt_map[:, :3], mask)


def test_depth_losses_hand_computed():
    target = jnp.array([[[1.0, 2.0, 4.0], [0.0, 3.0, 5.0]]])
    valid = depth_lib.valid_depth(target, 1e-3, 10.0)
    scaled = 2.0 * jnp.where(valid, target, 7.0)  # a global scale: no variance, no log-gradient
    silog = float(depth_lib.silog_loss(scaled, target, valid))
    assert silog == pytest.approx(10 * np.sqrt(0.15 * np.log(2.0) ** 2), rel=1e-5)
    assert float(depth_lib.gradient_loss(scaled, target, valid)) == pytest.approx(0.0, abs=1e-6)
    bumped = scaled.at[0, 0, 1].multiply(np.e)  # log residual +1 at one pixel
    # x pairs (row 0: 2 valid pairs, row 1: 1 valid pair): |1| twice over 3; y pairs valid: 2 columns, one has it.
    assert float(depth_lib.gradient_loss(bumped, target, valid)) == pytest.approx(2 / 3 + 1 / 2, rel=1e-5)
    assert np.isfinite(float(depth_lib.silog_loss(target, target, valid)))  # a perfect fit keeps finite values


def test_bin_centres_span_depth_range():
    widths = jnp.array([[0.5, 0.25, 0.25]])
    np.testing.assert_allclose(depth_lib.bin_centres(widths, 1.0, 9.0), [[3.0, 6.0, 8.0]])


@pytest.mark.parametrize("encoder_dim,flowfeat_dim", [(24, 0), (0, 16), (24, 16)])
@pytest.mark.slow
def test_probe_shapes_for_each_feature_choice(encoder_dim, flowfeat_dim):
    encoder = jnp.ones((2, 4, 4, 24)) if encoder_dim else None
    flowfeat = jnp.ones((2, 32, 32, 16)) if flowfeat_dim else None
    widths = dict(encoder_dim=encoder_dim, flowfeat_dim=flowfeat_dim)
    seg = seg_lib.SegmentationProbe(seg_lib.SegmentationProbeConfig(num_classes=5, num_heads=4, **widths),
                                    rngs=nnx.Rngs(0))
    assert seg(encoder, flowfeat, (32, 32)).shape == (2, 32, 32, 5)
    depth = depth_lib.DepthProbe(depth_lib.DepthProbeConfig(num_bins=8, num_queries=4, embed_dim=8, num_heads=2,
                                                            token_stride=8, **widths), rngs=nnx.Rngs(0))
    pred, centres = depth(encoder, flowfeat, (40, 40))
    assert pred.shape == (2, 40, 40) and centres.shape == (2, 8)
    assert bool(jnp.all((pred > 1e-3) & (pred < 10.0)))  # a convex combination of bin centres inside the range
    with pytest.raises(ValueError, match="needs FlowFeat features, encoder features or both"):
        seg_lib.SegmentationProbeConfig(num_classes=5)


def _attention_by_hand(probe: seg_lib.CrossAttentionProbe, features, tokens):
    """The probe's logits with its own weights, the keys/values given explicitly (B, N, C)."""
    attended = probe.cross_attn(jnp.broadcast_to(probe.queries[...], (tokens.shape[0], *probe.queries.shape[1:])),
                                tokens)
    return jnp.einsum("bhwc,bkc->bhwk", features, attended) / features.shape[-1]


@pytest.mark.slow
def test_flowfeat_key_value_downsampling_factor():
    """downscale 1 attends to every pixel (the behaviour before the factor existed); downscale 2 to the 2 x 2 block
    means (bilinear halving, align_corners=False); the encoder-only probe ignores the factor."""
    features = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 12, 16)), jnp.float32)
    for factor, tokens in ((1, features.reshape(2, -1, 16)),
                           (2, features.reshape(2, 4, 2, 6, 2, 16).mean(axis=(2, 4)).reshape(2, -1, 16))):
        probe = seg_lib.CrossAttentionProbe(16, 5, num_heads=4, downscale=factor, rngs=nnx.Rngs(3))
        np.testing.assert_allclose(np.asarray(probe(features)), np.asarray(_attention_by_hand(probe, features, tokens)),
                                   atol=1e-5)
    one = seg_lib.CrossAttentionProbe(16, 5, num_heads=4, downscale=1, rngs=nnx.Rngs(3))
    assert not np.allclose(np.asarray(probe(features)), np.asarray(one(features)), atol=1e-5)  # pooling matters
    for widths, pooled in ((dict(flowfeat_dim=16, encoder_dim=8), 4), (dict(encoder_dim=8), 1)):
        seg = seg_lib.SegmentationProbe(seg_lib.SegmentationProbeConfig(num_classes=5, downscale=4, **widths),
                                        rngs=nnx.Rngs(0))
        assert seg.attention.downscale == pooled


def test_probe_input_sizes_fit_both_patch_sizes():
    coco, nyu = load_config("probe_cocostuff").data, load_config("probe_nyu").data
    assert run_lib.input_sizes(coco, 16) == (256, 256) and run_lib.input_sizes(coco, 14) == (256, 252)
    assert run_lib.input_sizes(nyu, 16) == (480, 480) and run_lib.input_sizes(nyu, 14) == (480, 476)
    explicit = load_config("probe_cocostuff").data
    explicit.input_size = 224
    assert run_lib.input_sizes(explicit, 14) == (256, 224)
    explicit.input_size = 250
    with pytest.raises(ValueError, match="data.input_size 250 must be a multiple of 2 x patch 14"):
        run_lib.input_sizes(explicit, 14)


def test_cocostuff_crop_scores_labels_at_the_crop_and_feeds_the_network_size(tmp_path):
    _write_cocostuff(tmp_path / "coco", "val2017", 1)
    sample = data_lib.CocoStuffFolder(tmp_path / "coco", "val2017").load(0, 28, crop=32)
    assert sample["image"].shape == (28, 28, 3) and sample["labels"].shape == (32, 32)
    same = data_lib.CocoStuffFolder(tmp_path / "coco", "val2017").load(0, 32)
    np.testing.assert_array_equal(same["labels"], sample["labels"])


def test_paper_adam_is_torch_adam_with_l2_weight_decay():
    """The probe optimiser = torch.optim.Adam(lr, weight_decay): the decay joins the gradient before the moments."""
    import ml_collections
    import torch

    cfg = ml_collections.ConfigDict(dict(lr=1e-2, weight_decay=0.3))
    tx = run_lib.make_optimizer(cfg)
    target = np.array([1.0, -2.0, 0.5], np.float32)
    params = jnp.array([0.3, 0.1, -0.4])
    state = tx.init(params)
    torch_params = torch.tensor([0.3, 0.1, -0.4], requires_grad=True)
    torch_opt = torch.optim.Adam([torch_params], lr=1e-2, weight_decay=0.3)
    for _ in range(5):
        grads = 2 * (params - target)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        torch_opt.zero_grad()
        ((torch_params - torch.from_numpy(target)) ** 2).sum().backward()
        torch_opt.step()
    np.testing.assert_allclose(np.asarray(params), torch_params.detach().numpy(), atol=1e-6)


# --- overfitting tiny synthetic sets --------------------------------------------------------------------------------
def _fit(probe, loss, features, batch, steps, lr):
    graphdef, state = nnx.split(probe)
    params = nnx.to_pure_dict(state)
    tx = optax.adam(lr)
    step = run_lib.make_train_step(graphdef, lambda model_params, images: model_params, loss, tx)
    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state, features, batch)
        losses.append(float(value))
    return nnx.merge(graphdef, params), losses


@pytest.mark.slow
def test_attention_probe_overfits_synthetic_segmentation():
    rng = np.random.default_rng(0)
    num, height, width, classes = 4, 16, 16, 3
    labels = np.zeros((num, height, width), np.int32)
    for i in range(num):
        labels[i, :, 4 + 2 * i :] = 1
        labels[i, 10 - i :, :] = 2
    labels[0, 0, 0] = 255
    embedding = rng.standard_normal((classes, 16))
    flowfeat = (embedding[labels.clip(0, classes - 1)] + 0.3 * rng.standard_normal((num, height, width, 16)))
    flowfeat = jnp.asarray(flowfeat, jnp.float32)
    encoder = flowfeat.reshape(num, 4, 4, 4, 4, 16).mean((2, 4))
    cfg = seg_lib.SegmentationProbeConfig(num_classes=classes, flowfeat_dim=16, encoder_dim=16, num_heads=4)

    def loss(probe, enc, ff, batch):
        return seg_lib.cross_entropy_ignore(probe(enc, ff, batch["labels"].shape[1:3]), batch["labels"])

    batch = {"image": np.zeros((num, 1), np.uint8), "labels": labels}
    probe, losses = _fit(seg_lib.SegmentationProbe(cfg, rngs=nnx.Rngs(0)), loss, (encoder, flowfeat), batch, 120, 1e-2)
    assert losses[-1] < 0.05 * losses[0]
    pred = jnp.argmax(probe(encoder, flowfeat, (height, width)), -1)
    scores = seg_lib.segmentation_scores(np.asarray(seg_lib.confusion_matrix(pred, labels, classes)))
    assert scores["miou"] > 0.99 and scores["pixel_accuracy"] > 0.99


@pytest.mark.slow
def test_depth_head_overfits_synthetic_depth():
    rng = np.random.default_rng(0)
    num, height, width = 4, 16, 16
    yy, xx = np.mgrid[:height, :width]
    depth = np.stack([1 + 0.2 * yy + 0.1 * i * xx for i in range(num)]).astype(np.float32)
    depth[0, 0, :3] = 0  # missing measurements
    freqs = np.array([0.5, 1, 2, 4])
    features = np.concatenate([np.sin(depth[..., None] * freqs), np.cos(depth[..., None] * freqs),
                               depth[..., None] / 5, 0.05 * rng.standard_normal((num, height, width, 7))], -1)
    cfg = depth_lib.DepthProbeConfig(flowfeat_dim=16, num_bins=32, num_queries=16, embed_dim=16, num_heads=2,
                                     token_stride=4)

    def loss(probe, enc, ff, batch):
        pred, _ = probe(enc, ff, batch["depth"].shape[1:3])
        valid = depth_lib.valid_depth(batch["depth"], 1e-3, 10.0)
        return depth_lib.silog_loss(pred, batch["depth"], valid) + depth_lib.gradient_loss(pred, batch["depth"], valid)

    batch = {"image": np.zeros((num, 1), np.uint8), "depth": depth}
    probe, losses = _fit(depth_lib.DepthProbe(cfg, rngs=nnx.Rngs(0)), loss, (None, jnp.asarray(features, jnp.float32)),
                         batch, 120, 5e-3)
    assert losses[-1] < 0.1 * losses[0]
    pred, centres = probe(None, jnp.asarray(features, jnp.float32), (height, width))
    assert centres.shape == (num, 32) and bool(jnp.all(jnp.diff(centres, axis=-1) > 0))
    errors = [depth_lib.image_depth_errors(np.asarray(p), g, np.ones(g.shape, bool)) for p, g in zip(pred, depth)]
    assert np.mean([e["delta1"] for e in errors]) > 0.99 and np.mean([e["abs_rel"] for e in errors]) < 0.03


# --- data sources and bad inputs ------------------------------------------------------------------------------------
def _write_cocostuff(root, split, count, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "stuffthingmaps_trainval2017" / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        labels = np.full(size[::-1], 123, np.uint8)  # grass (plant)
        labels[: size[1] // 2] = 156  # sky-other
        labels[:, : 10 + 3 * i] = 0  # person
        labels[-2:, -2:] = 255
        image = np.asarray([[40, 200, 60], [90, 140, 255], [200, 120, 90]], np.uint8)[
            np.select([labels == 123, labels == 156, labels == 0], [0, 1, 2], 0)]
        image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / split / f"{i:012d}.jpg", quality=95)
        Image.fromarray(labels).save(root / "stuffthingmaps_trainval2017" / split / f"{i:012d}.png")


def _write_nyu(root, split, count, size=(64, 48), npy=False):
    (root / split / "rgb").mkdir(parents=True, exist_ok=True)
    (root / split / "depth").mkdir(parents=True, exist_ok=True)
    yy = np.mgrid[: size[1], : size[0]][0]
    for i in range(count):
        depth = (1.0 + 0.05 * yy + 0.3 * i).astype(np.float32)
        depth[:2, :2] = 0
        image = np.repeat((255 * depth[..., None] / depth.max()).astype(np.uint8), 3, -1)
        Image.fromarray(image).save(root / split / "rgb" / f"{i:05d}.png")
        if npy:
            np.save(root / split / "depth" / f"{i:05d}.npy", depth)
        else:
            Image.fromarray((depth * 1000).astype(np.uint16)).save(root / split / "depth" / f"{i:05d}.png")


def test_cocostuff_folder_and_errors(tmp_path):
    _write_cocostuff(tmp_path, "val2017", 2)
    source = data_lib.CocoStuffFolder(tmp_path, "val2017")
    item = source.load(1, 32)
    assert item["image"].shape == (32, 32, 3) and item["labels"].shape == (32, 32)
    assert set(np.unique(item["labels"])) <= {9, 22, 23, 255}  # person, plant, sky, ignore
    with pytest.raises(FileNotFoundError, match="COCO-Stuff images"):
        data_lib.CocoStuffFolder(tmp_path, "train2017")
    (tmp_path / "images" / "val2017" / "000000000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000000000001.jpg"):
        source.load(1, 32)
    Image.fromarray(np.full((40, 48), 190, np.uint8)).save(tmp_path / "stuffthingmaps_trainval2017/val2017/x.png")
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "images/val2017/x.jpg")
    bad = data_lib.CocoStuffFolder(tmp_path, "val2017")
    with pytest.raises(ValueError, match=r"x.png: not COCO-Stuff fine class ids .*\[190\]"):
        bad.load(bad.ids.index("x"), 32)


def test_nyu_folder_masks_invalid_depth_and_errors(tmp_path):
    _write_nyu(tmp_path, "test", 1)
    _write_nyu(tmp_path, "npy", 1, npy=True)
    depth_npy = np.load(tmp_path / "npy/depth/00000.npy")
    depth_npy[5, 5], depth_npy[6, 6] = np.nan, -1.0
    np.save(tmp_path / "npy/depth/00000.npy", depth_npy)
    image, depth = data_lib.NyuFolder(tmp_path, "test").load(0)
    assert image.shape == (48, 64, 3) and depth.dtype == np.float32 and depth[0, 0] == 0
    assert depth[10, 10] == pytest.approx(1.5)  # millimetres -> metres
    _, depth = data_lib.NyuFolder(tmp_path, "npy").load(0)
    assert depth[5, 5] == 0 and depth[6, 6] == 0 and np.isfinite(depth).all()
    sample = data_lib.nyu_sample(image, depth, 48, 32)
    assert sample["image"].shape == (32, 32, 3) and sample["depth"].shape == (48, 48)
    with pytest.raises(ValueError, match="smaller than the 64x64"):
        data_lib.nyu_sample(image, depth, 64, 32)
    (tmp_path / "test/depth/00000.png").unlink()
    with pytest.raises(FileNotFoundError, match="missing depth for 00000.png"):
        data_lib.NyuFolder(tmp_path, "test")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "test/depth/00000.png")
    with pytest.raises(ValueError, match="16-bit"):
        data_lib.NyuFolder(tmp_path, "test").load(0)
    with pytest.raises(FileNotFoundError, match="NYUv2 split"):
        data_lib.NyuFolder(tmp_path, "train")


def test_eigen_crop_on_480x640():
    mask = data_lib.eigen_mask(480, 640)
    assert mask.sum() == (471 - 45) * (601 - 41) and mask[45, 41] and not mask[44, 41] and not mask[45, 601]


def test_nyu_tfds_source_mocked():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        source = data_lib.NyuTfds("validation")
        image, depth = source.load(1)
    assert len(source) == 2 and image.shape == (480, 640, 3) and image.dtype == np.uint8
    assert depth.shape == (480, 640) and depth.dtype == np.float32 and np.isfinite(depth).all()
    sample = data_lib.nyu_sample(image, depth, 480, 448)
    # On the 480 x 480 centre square (columns 80..559) the Eigen crop keeps rows 45..470 over the full width.
    assert sample["eigen"][45:471].all() and not sample["eigen"][:45].any() and not sample["eigen"][471:].any()


def test_input_size_must_fit_patch_grid():
    run_lib.check_input_size(448, 14)
    with pytest.raises(ValueError, match="multiple of 2 x patch 14 .*476"):
        run_lib.check_input_size(480, 14)


def test_batches_resume_sequence():
    def load(i):
        return {"x": np.array([i])}

    full = [b["index"].tolist() for _, b in zip(range(5), data_lib.batches(load, 5, 2, seed=3))]
    resumed = [b["index"].tolist() for _, b in zip(range(3), data_lib.batches(load, 5, 2, seed=3, start_batch=2))]
    assert resumed == full[2:] and len({i for b in full[:2] for i in b}) == 4
    assert [b["index"].tolist() for b in data_lib.batches(load, 5, 2)] == [[0, 1], [2, 3], [4]]


# --- CLI smoke runs (subprocesses, ~30 s each on 2 cores) ------------------------------------------------------
TINY = {
    **TINY_MODEL, "model.encoder_size.patch_size": 8, "data.input_size": 32,
    "train.num_steps": 3, "train.batch_size": 2, "train.log_every": 1, "train.checkpoint_every": 2,
    "eval.batch_size": 2, "eval.num_pictures": 2, "data.num_workers": 2,
}
TINY_FLAGS = config_flags(TINY)


def _cli(config, workdir, *overrides):
    cmd = [sys.executable, "-m", "flowfeat_jax.probe", f"--config={config}", f"--workdir={workdir}", *TINY_FLAGS,
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_cocostuff_smoke(tmp_path):
    _write_cocostuff(tmp_path / "coco", "train2017", 3)
    _write_cocostuff(tmp_path / "coco", "val2017", 2, seed=1)
    out = _cli("configs/probe_cocostuff.py", tmp_path / "run", f"--config.data.root={tmp_path / 'coco'}",
               "--config.probe.num_heads=4", "--config.data.eval_crop=32", "--config.pamr.num_iter=2")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["miou_pamr"] <= 1 and metrics["num_images"] == 2
    log = [json.loads(line) for line in (tmp_path / "run/train_log.jsonl").read_text().splitlines()]
    assert len(metrics["classes"]) == 27 and [r["step"] for r in log] == [1, 2, 3]
    assert metrics["last_loss"] == log[-1]["loss"] and np.isfinite(metrics["last_loss"])
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    pictures = sorted((tmp_path / "run/pictures").glob("*.png"))
    assert len(pictures) == 2 and Image.open(pictures[0]).size == (4 * 32, 32)  # image | gt | probe | PAMR


@pytest.mark.slow
def test_cli_nyu_folder_smoke(tmp_path):
    _write_nyu(tmp_path / "nyu", "train", 3)
    _write_nyu(tmp_path / "nyu", "test", 2, npy=True)
    out = _cli("configs/probe_nyu.py", tmp_path / "run", "--config.data.source=folder",
               f"--config.data.root={tmp_path / 'nyu'}", "--config.data.eval_split=test", "--config.data.eval_crop=48",
               "--config.probe.num_bins=16", "--config.probe.num_queries=8", "--config.probe.embed_dim=16",
               "--config.probe.token_stride=8", "--config.features.which=both")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["invalid_images"] == 0
    assert metrics["rmse"] > 0 and 0 <= metrics["delta1"] <= metrics["delta2"] <= metrics["delta3"] <= 1
    assert len(list((tmp_path / "run/pictures").glob("*.png"))) == 2
    assert "rmse=" in out.stdout


@pytest.mark.slow
def test_missing_data_is_one_line_error(tmp_path, capsys):
    from flowfeat_jax import cli

    config = _load_config("configs/probe_cocostuff.py")
    config.update_from_flattened_dict(TINY)
    config.data.root = str(tmp_path / "missing")
    assert cli.run_guarded(lambda: run_lib.run(config, tmp_path / "run"), prog="probe", verbose=False) == 1
    assert capsys.readouterr().err.strip() == f"probe: error: {tmp_path / 'missing'}: COCO-Stuff root folder not found"


def _load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.slow
def test_nyu_tfds_probe_run_mocked(tmp_path):
    """The default NYU config (tfds source) end to end on mocked nyu_depth_v2, in process."""
    tfds = pytest.importorskip("tensorflow_datasets")
    config = _load_config("configs/probe_nyu.py")
    config.update_from_flattened_dict(TINY)
    config.features.which = "flowfeat"
    config.train.num_steps = 2
    config.probe.update(num_bins=16, num_queries=8, embed_dim=16, token_stride=8)
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        metrics = run_lib.run(config, tmp_path)
    assert metrics["num_images"] + metrics["invalid_images"] == 2 and metrics["features"] == "flowfeat"
    assert np.isfinite(metrics["rmse"]) and 0 <= metrics["delta1"] <= 1
    assert Image.open(next((tmp_path / "pictures").glob("*.png"))).size == (3 * 480, 480)


def test_probe_cli_refuses_the_old_train_steps_name(tmp_path):
    """The probe configs name the step count as the train configs do (train.num_steps); the old name stops the CLI
    before any work."""
    out = _cli("configs/probe_nyu.py", tmp_path / "run", "--config.train.steps=3")
    assert out.returncode != 0
    assert out.stderr.strip() == "flowfeat_jax.probe: error: unknown config key in --config.train.steps=3: 'steps'"
    assert not (tmp_path / "run").exists()


# --- the train loop's machinery in the probe trainer: stop and resume, the non-finite guard ---------------------------
def _small_coco_config(root, **train):
    """The COCO-Stuff probe on the tiny random model, encoder features only (no FlowFeat pass, no PAMR): seconds."""
    config = _load_config("configs/probe_cocostuff.py")
    config.update_from_flattened_dict(TINY)
    config.data.root, config.data.eval_crop, config.data.num_workers = str(root), 32, 0
    config.features.which, config.pamr.enabled, config.probe.num_heads = "encoder", False, 4
    config.log.tensorboard = False
    for key, value in train.items():
        config.train[key] = value
    return config


def _probe_digest(workdir):
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints")
    step = checkpointer.latest_step()
    state, _ = checkpointer.restore_raw(step)
    checkpointer.close()
    return step, ckpt_lib.tree_digest(state["params"])


@pytest.mark.slow
def test_probe_stopped_by_sigterm_saves_and_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    _write_cocostuff(tmp_path / "coco", "train2017", 3)
    _write_cocostuff(tmp_path / "coco", "val2017", 2, seed=1)
    config = _small_coco_config(tmp_path / "coco", num_steps=4, checkpoint_every=10)
    full = run_lib.run(config, tmp_path / "full")

    make_train_step = run_lib.make_train_step

    def signalled_after_two_steps(*args):
        step, calls = make_train_step(*args), []

        def counted(*step_args):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # through the run's handler: no checkpoint is due at step 2
            return step(*step_args)

        return counted

    monkeypatch.setattr(run_lib, "make_train_step", signalled_after_two_steps)
    with pytest.raises(run_support.TrainingError, match="stopped by SIGTERM after step 2; checkpoint saved in"):
        run_lib.run(config, tmp_path / "stopped")
    assert _probe_digest(tmp_path / "stopped")[0] == 2 and not (tmp_path / "stopped/metrics.json").exists()
    monkeypatch.setattr(run_lib, "make_train_step", make_train_step)
    capsys.readouterr()
    resumed = run_lib.run(config, tmp_path / "stopped")
    assert "resuming from step 2" in capsys.readouterr().out
    assert _probe_digest(tmp_path / "stopped") == _probe_digest(tmp_path / "full")  # bitwise on CPU
    rows = {name: [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
            for name in ("full", "stopped")}
    assert [r["step"] for r in rows["stopped"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows["stopped"]] == [r["loss"] for r in rows["full"]]
    assert resumed["miou"] == full["miou"] and resumed["last_loss"] == full["last_loss"]
    assert (tmp_path / "stopped/metrics.json").read_text() == (tmp_path / "full/metrics.json").read_text()

    # The resume rules of the FlowFeat loop hold: changed training settings are refused, nothing is written.
    config.train.lr = 3e-4
    with pytest.raises(run_support.TrainingError, match=r"resuming from step 4 .*train.lr: 0.0001 -> 0.0003"):
        run_lib.run(config, tmp_path / "stopped")


def test_probe_step_with_a_non_finite_update_leaves_the_probe_unchanged():
    probe = seg_lib.SegmentationProbe(seg_lib.SegmentationProbeConfig(num_classes=3, flowfeat_dim=8, num_heads=2),
                                      rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(probe)
    params = nnx.to_pure_dict(state)
    before = ckpt_lib.tree_digest(params)
    tx = run_lib.make_optimizer(ml_collections.ConfigDict(dict(lr=float("nan"), weight_decay=0.0)))
    opt_state = tx.init(params)
    opt_before = ckpt_lib.tree_digest(opt_state)

    def loss(probe, encoder, flowfeat, batch):
        return seg_lib.cross_entropy_ignore(probe(encoder, flowfeat, batch["labels"].shape[1:3]), batch["labels"])

    step = run_lib.make_train_step(graphdef, lambda model_params, images: model_params, loss, tx)
    features = (None, jnp.ones((1, 4, 4, 8)))
    batch = {"image": np.zeros((1, 1), np.uint8), "labels": np.zeros((1, 4, 4), np.int32)}
    params, opt_state, value = step(params, opt_state, features, batch)
    assert np.isnan(float(value))  # a finite loss and gradient, a NaN update: the step is discarded
    assert ckpt_lib.tree_digest(params) == before and ckpt_lib.tree_digest(opt_state) == opt_before


@pytest.mark.slow
def test_probe_run_stops_after_max_nonfinite_steps_with_the_probe_unchanged(tmp_path):
    _write_cocostuff(tmp_path / "coco", "train2017", 3)
    config = _small_coco_config(tmp_path / "coco", num_steps=6, checkpoint_every=2, max_nonfinite=3)
    config.train.lr = float("nan")
    with pytest.raises(run_support.TrainingError, match=r"3 consecutive non-finite steps, 1 to 3; images of step 3"):
        run_lib.run(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isnan(r["loss"]) for r in rows)  # step 3 stopped it
    # The checkpoint of step 2 holds the initial probe (each NaN update was discarded); the run stopped before step 4.
    model, _ = run_lib.build_feature_model(config)
    initial = nnx.to_pure_dict(nnx.split(run_lib.make_probe(config, model))[1])
    assert _probe_digest(tmp_path / "run") == (2, ckpt_lib.tree_digest(initial))
    assert not (tmp_path / "run/metrics.json").exists()
