"""J&F scorer: hand-computed masks, the official rules transcribed plainly, palette I/O and real DAVIS masks."""

import json
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from flowfeat_jax.eval import davis, jf

H, W = 480, 854  # DAVIS 480p: diagonal 979.6, tolerance ceil(7.84) = 8 pixels


# --- a plain transcription of davis2017-evaluation (metrics.py, utils.py), one frame at a time ----------------------
def _official_bmap(seg):
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def _official_f(fg, gt, bound_th=0.008):
    bound_pix = np.ceil(bound_th * np.linalg.norm(fg.shape))
    r = np.arange(-bound_pix, bound_pix + 1)
    footprint = ((r[:, None] ** 2 + r[None, :] ** 2) <= bound_pix**2).astype(np.uint8)
    fg_b, gt_b = _official_bmap(fg), _official_bmap(gt)
    fg_dil = cv2.dilate(fg_b.astype(np.uint8), footprint)
    gt_dil = cv2.dilate(gt_b.astype(np.uint8), footprint)
    n_fg, n_gt = np.sum(fg_b), np.sum(gt_b)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_b * gt_dil) / float(n_fg), np.sum(gt_b * fg_dil) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _official_j(gt, seg):
    inter, union = np.sum(gt & seg), np.sum(gt | seg)
    return 1.0 if np.isclose(union, 0) else inter / union


def _official_stats(v):
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.uint8)
    bins = [v[ids[i]: ids[i + 1] + 1] for i in range(4)]
    return np.nanmean(v), np.nanmean(v > 0.5), np.nanmean(bins[0]) - np.nanmean(bins[3])


def _official_sequence(gt_labels, pred_labels):
    """Per-object (J stats, F stats) with the reference's frame and object rules."""
    out = {}
    for k in range(1, int(gt_labels[0].max()) + 1):
        g, p = gt_labels[1:-1] == k, pred_labels[1:-1] == k
        out[k] = (_official_stats(np.array([_official_j(a, b) for a, b in zip(g, p)])),
                  _official_stats(np.array([_official_f(b, a) for a, b in zip(g, p)])))
    return out


def _band(start_col, height=H, width=W):
    mask = np.zeros((height, width), bool)
    mask[:, start_col:] = True
    return mask


# --- hand-made masks -------------------------------------------------------------------------------------------
def test_disk_and_radius():
    np.testing.assert_array_equal(jf.disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    assert jf.disk(2).sum() == 13 and jf.disk(8).shape == (17, 17)
    assert jf.boundary_radius(H, W) == 8
    assert jf.boundary_radius(100, 100, bound_th=3) == 3


def test_boundary_map_of_rectangle():
    mask = np.zeros((10, 12), bool)
    mask[3:7, 4:9] = True  # 4 x 5 rectangle: boundary is the closed loop rows 2, 6 and columns 3, 8 (2H + 2W pixels)
    bmap = jf.boundary_map(mask)
    assert bmap.sum() == 2 * 4 + 2 * 5
    assert bmap[2, 3:9].all() and bmap[6, 3:9].all() and bmap[2:7, 3].all() and bmap[2:7, 8].all()


def test_jaccard_hand_values():
    gt = np.zeros((3, 10, 10), bool)
    pred = np.zeros_like(gt)
    gt[0, 2:6, 2:6] = True
    pred[0, 2:6, 3:7] = True  # 12 shared of 20 pixels
    gt[2, 0, 0] = True  # frame 1: both empty -> 1; frame 2: prediction empty -> 0
    np.testing.assert_allclose(jf.jaccard(gt, pred), [12 / 20, 1.0, 0.0])


def test_f_empty_cases():
    empty, full = np.zeros((H, W), bool), _band(300)
    f = jf.f_measure(np.stack([empty, full, empty]), np.stack([empty, empty, full]))
    np.testing.assert_allclose(f, [1.0, 0.0, 0.0])  # both empty; missed object; hallucinated object


def test_f_boundary_tolerance():
    gt = np.stack([_band(300)] * 3)
    pred = np.stack([_band(300 + 8), _band(300 + 9), _band(300)])  # shift = radius, radius + 1, none
    np.testing.assert_allclose(jf.f_measure(gt, pred), [1.0, 0.0, 1.0])


def test_f_partial_step_by_hand():
    # GT boundary: column c - 1, all H rows. Prediction: band at c for rows < m, at c + s below (s > r = 8).
    # Its boundary: column c - 1 for rows < m - 1, row m - 1 for columns c - 1 .. c + s - 1, then column c + s - 1:
    # H + s pixels. Matched within r: (m - 1) + (r + 1) predicted, m + r ground-truth pixels.
    c, m, s, r = 300, 240, 20, 8
    pred = _band(c)
    pred[m:, c: c + s] = False
    precision, recall = (m + r) / (H + s), (m + r) / H
    expected = 2 * precision * recall / (precision + recall)
    np.testing.assert_allclose(jf.f_measure(_band(c)[None], pred[None]), [expected], rtol=1e-12)
    np.testing.assert_allclose(expected, _official_f(pred, _band(c)), rtol=1e-12)


def test_db_statistics_hand_values():
    mean, recall, decay = jf.db_statistics(np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]))
    # bins: edges round(linspace(1, 6, 5)) - 1 = 0, 1, 3, 4, 5 -> first [1, .8], last [.2, 0]
    np.testing.assert_allclose((mean, recall, decay), (0.5, 0.5, 0.8))


def test_matches_official_transcription_on_random_blobs():
    rng = np.random.default_rng(0)
    size = (6, 60, 80)
    smooth = lambda x: cv2.GaussianBlur(x, (0, 0), 4)  # noqa: E731
    fields = np.stack([smooth(rng.standard_normal(size[1:]).astype(np.float32)) for _ in range(2 * size[0])])
    gt = np.digitize(fields[: size[0]], [-0.1, 0.1]).astype(np.uint8)  # 3 labels: 0, 1, 2
    pred = np.digitize(fields[size[0]:] * 0.3 + fields[: size[0]], [-0.1, 0.1]).astype(np.uint8)
    pred[2] = 0  # an empty prediction frame
    scores = jf.score_sequence("blobs", gt, pred)
    official = _official_sequence(gt, pred)
    assert sorted(scores) == ["blobs_1", "blobs_2"]
    for k, (j_stats, f_stats) in official.items():
        got = scores[f"blobs_{k}"]
        np.testing.assert_allclose([got["J_mean"], got["J_recall"], got["J_decay"]], j_stats, atol=1e-12)
        np.testing.assert_allclose([got["F_mean"], got["F_recall"], got["F_decay"]], f_stats, atol=1e-12)
        assert 0 < got["J_mean"] < 1 and 0 < got["F_mean"] < 1


# --- files: palette PNGs, errors, CLI ----------------------------------------------------------------------------
def _write_davis(root, sequence, labels, palette=True):
    (root / "ImageSets").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "val.txt").write_text(sequence + "\n")
    for t, label in enumerate(labels):
        path = root / "Annotations" / "480p" / sequence / f"{t:05d}.png"
        if palette:
            davis.write_index_png(path, label)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), label)


def test_multi_object_palette(tmp_path):
    gt = np.zeros((5, 40, 60), np.uint8)
    gt[:, 5:20, 5:25] = 1
    gt[:, 22:35, 30:55] = 2
    gt[0, 0, 0] = davis.VOID_LABEL  # void becomes background
    _write_davis(tmp_path / "gt", "two", gt)
    pred = np.where(gt == 2, 0, gt)  # object 2 never found
    for t in range(1, 4):
        davis.write_index_png(tmp_path / "res" / "two" / f"{t:05d}.png", pred[t])
    labels, ids = davis.read_annotations(tmp_path / "gt", "two")
    assert labels[0, 0, 0] == 0 and ids == [f"{t:05d}" for t in range(5)]
    scores = jf.score_results(tmp_path / "gt", tmp_path / "res", progress=False)
    assert scores["objects"]["two_1"]["J_mean"] == 1.0 and scores["objects"]["two_1"]["F_mean"] == 1.0
    assert scores["objects"]["two_2"]["J_mean"] == 0.0 and scores["objects"]["two_2"]["F_mean"] == 0.0
    assert scores["global"]["JF_mean"] == 0.5 and scores["global"]["J_recall"] == 0.5

    davis.write_index_png(tmp_path / "res" / "two" / "00002.png", np.full((40, 60), 3, np.uint8))
    with pytest.raises(ValueError, match=r"00002\.png: object id 3 .* 2 object"):
        jf.score_results(tmp_path / "gt", tmp_path / "res", progress=False)
    davis.write_index_png(tmp_path / "res" / "two" / "00002.png", np.zeros((40, 61), np.uint8))
    with pytest.raises(ValueError, match=r"00002\.png: result size 61x40"):
        jf.score_results(tmp_path / "gt", tmp_path / "res", progress=False)
    (tmp_path / "res" / "two" / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"two/00002\.png"):
        jf.score_results(tmp_path / "gt", tmp_path / "res", progress=False)


def test_davis2016_binary_masks_are_one_object(tmp_path):
    gt = np.zeros((4, 30, 40), np.uint8)
    gt[:, 10:20, 10:30] = 255
    _write_davis(tmp_path, "single", gt, palette=False)
    labels, _ = davis.read_annotations(tmp_path, "single")
    assert set(np.unique(labels)) == {0, 1}
    assert list(jf.score_sequence("single", labels, labels)) == ["single_1"]


def test_tfds_source_mocked():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        videos = list(davis.tfds_sequences())
    assert len(videos) == 2
    for name, frames, labels in videos:
        assert isinstance(name, str) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
        assert labels.dtype == np.uint8 and labels.ndim == 3  # (the mock draws frame counts independently)
        assert labels.max() < davis.VOID_LABEL  # void became background


# --- shared DAVIS-2016 sequences -------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_sequences_ground_truth_and_eroded(davis_root, tmp_path, capsys):
    sequences = ["blackswan", "dog"]
    for sequence in sequences:
        labels, ids = davis.read_annotations(davis_root, sequence)
        for label, frame_id in zip(labels, ids):
            davis.write_index_png(tmp_path / "res" / sequence / f"{frame_id}.png", label)
    out = tmp_path / "scores.json"
    cmd = [sys.executable, "tools/score_davis.py", f"--davis={davis_root}", f"--results={tmp_path / 'res'}",
           f"--out={out}", "--sequences=" + ",".join(sequences), f"--csv={tmp_path / 'scores.csv'}"]
    subprocess.run(cmd, check=True, capture_output=True)
    scores = json.loads(out.read_text())
    assert set(scores["objects"]) == {"blackswan_1", "dog_1"}
    assert scores["global"] == pytest.approx(dict(JF_mean=1, J_mean=1, J_recall=1, J_decay=0, F_mean=1, F_recall=1,
                                                  F_decay=0))
    assert (tmp_path / "scores.csv").read_text().splitlines()[-1].startswith("global,1.000000")

    (tmp_path / "res" / "dog" / "00003.png").unlink()
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].endswith("dog/00003.png")

    gt, _ = davis.read_annotations(davis_root, "blackswan")
    eroded = np.stack([cv2.erode(label, np.ones((3, 3), np.uint8), iterations=4) for label in gt])
    start = time.perf_counter()
    stats = jf.score_sequence("blackswan", gt, eroded)["blackswan_1"]
    elapsed = time.perf_counter() - start
    official = _official_sequence(gt[:6], eroded[:6])[1]
    short = jf.score_sequence("blackswan", gt[:6], eroded[:6])["blackswan_1"]
    np.testing.assert_allclose([short["J_mean"], short["F_mean"]], [official[0][0], official[1][0]], atol=1e-12)
    assert 0.8 < stats["J_mean"] < 1 and stats["F_mean"] <= 1
    with capsys.disabled():
        print(f"\nscorer: {elapsed:.3f} s for blackswan ({len(gt)} frames, 480p)")
