"""Flow exporter: DIS export of two DAVIS sequences, parity with cv2 DIS, resume, workers and bad input."""

import importlib.util
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import CLIP_FRAMES as NUM_FRAMES
from conftest import CLIP_SEQUENCES as SEQUENCES
from PIL import Image

from flowfeat_jax.data import export, records
from flowfeat_jax.flow import dis, methods

CFG = export.ExportConfig(method="dis", frame_size=128, flow_size=64, videos_per_shard=1)
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(davis_clips, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("export")
    export.export_flows(davis_clips, out, CFG, progress=False)
    return out


def _raw_records(out: pathlib.Path) -> dict[str, list[bytes]]:
    from array_record.python.array_record_module import ArrayRecordReader

    content = {}
    for path in sorted(out.glob("*.array_record")):
        reader = ArrayRecordReader(str(path))
        content[path.name] = list(reader.read(0, reader.num_records()))
        reader.close()
    return content


def _reference_square(path: pathlib.Path, size: int) -> Image.Image:
    """torchvision Resize(size) + CenterCrop(size) on a PIL image, written out step by step."""
    image = Image.open(path).convert("RGB")
    width, height = image.size  # DAVIS 854x480: landscape
    resized = image.resize((int(size * width / height), size), Image.BILINEAR)
    left = int(round((resized.width - size) / 2.0))
    return resized.crop((left, 0, left + size, size))


def test_pair_indexing_matches_the_record_order():
    for length, gap in ((10, 2), (12, 3), (5, 1)):
        order = [(t, p) for t in range(length) for p in range(length) if 0 < abs(p - t) <= gap]
        assert [records.pair_index(t, p, length, gap) for t, p in order] == list(range(len(order)))
        assert records.num_pairs(length, gap) == len(order)
    with pytest.raises(ValueError, match="not a pair"):
        records.pair_index(3, 6, 10, 2)


def test_resize_and_crop_follow_torchvision():
    image = Image.new("RGB", (854, 480))
    assert export.resize_short_side(image, 448).size == (797, 448)  # int(448 * 854 / 480) = 797
    assert export.resize_short_side(Image.new("RGB", (480, 854)), 448).size == (448, 797)
    columns = np.broadcast_to(np.arange(797, dtype=np.uint16)[None, :], (448, 797)).astype(np.int32)
    square = np.asarray(export.center_crop_square(Image.fromarray(columns, mode="I"), 448))
    # (797 - 448) / 2 = 174.5 rounds half-to-even to 174, as torchvision's int(round(...)).
    assert square.shape == (448, 448) and square[0, 0] == 174 and square[0, -1] == 174 + 447
    assert export.pixels_to_normalised(np.full((1, 4, 8, 2), 2.0, np.float32))[0, 0, 0].tolist() == [0.5, 1.0]


def test_export_totals_and_flows_match_cv2_dis(exported, davis_clips):
    manifest = json.loads((exported / "manifest.json").read_text())
    pairs_per_video = 4 * NUM_FRAMES - 6  # gap 2: frames 0 and 11 have 2 partners, 1 and 10 have 3
    assert (manifest["num_videos"], manifest["num_frames"], manifest["num_pairs"]) == (2, 24, 2 * pairs_per_video)
    assert manifest["num_skipped"] == 0 and manifest["method"] == "dis" and len(manifest["shards"]) == 2
    assert manifest["params"]["frame_size"] == 128 and manifest["params"]["flow_size"] == 64

    opened = records.open_flow_records(exported)
    flows = records.read_all_pairs(opened)
    assert len(flows) == 2 * pairs_per_video and opened.names == SEQUENCES
    clip_dirs = [davis_clips.parent / name for name in SEQUENCES]
    dis_flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    for video, t, partner in ((0, 0, 2), (0, 7, 6), (1, 5, 3), (1, 11, 10)):
        frames = sorted(clip_dirs[video].glob("*.jpg"))
        small = [np.asarray(_reference_square(frames[i], 128).resize((64, 64), Image.BILINEAR)) for i in (t, partner)]
        gray = [cv2.cvtColor(s, cv2.COLOR_RGB2GRAY) for s in small]
        expected = dis_flow.calc(gray[0], gray[1], None) * (2 / 64)
        got = flows[(video, t, partner)]
        assert got.shape == (64, 64, 2) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)  # float16 storage
        assert np.abs(expected).max() > 0.01  # the clips do move

    frame_records = _raw_records(exported)["frames-0-of-1-00001.array_record"]
    header, jpeg = records.decode_record(frame_records[4])
    assert (header["video"], header["t"], header["name"]) == (1, 4, "dog-agility")
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)))
    reference = np.asarray(_reference_square(sorted(clip_dirs[1].glob("*.jpg"))[4], 128))
    assert decoded.shape == (128, 128, 3) and np.abs(decoded.astype(int) - reference).mean() < 2.0


class _Interrupt(Exception):
    pass


def test_interrupted_export_resumes_to_the_same_records(exported, davis_clips, tmp_path):
    calls = []
    real = dis.DisFlow()

    def crashing_flow(img1, img2):
        calls.append(len(img1))
        if sum(calls) > 45:  # past the 42 pairs of the first video, inside the second shard
            raise _Interrupt
        return real(img1, img2)

    out = tmp_path / "out"
    with pytest.raises(_Interrupt):
        export.export_flows(davis_clips, out, CFG, flow_fn=crashing_flow, progress=False)
    assert (out / "shard-0-of-1-00000.json").is_file() and not (out / "shard-0-of-1-00001.json").exists()
    assert (out / "flows-0-of-1-00001.array_record.tmp").is_file()  # the half-written shard
    first_shard = (out / "frames-0-of-1-00000.array_record").stat()

    export.export_flows(davis_clips, out, CFG, progress=False)
    assert (out / "frames-0-of-1-00000.array_record").stat().st_mtime_ns == first_shard.st_mtime_ns  # kept
    assert not list(out.glob("*.tmp"))
    assert _raw_records(out) == _raw_records(exported)
    resumed, clean = (json.loads((d / "manifest.json").read_text()) for d in (out, exported))
    assert resumed["shards"] == clean["shards"] and resumed["num_pairs"] == clean["num_pairs"]


def test_workers_write_manifest_parts_read_as_one(exported, davis_clips, tmp_path):
    out = tmp_path / "parts"
    for index in (1, 0):
        cfg = export.ExportConfig(**{**CFG.__dict__, "num_shards": 2, "shard_index": index})
        part = export.export_flows(davis_clips, out, cfg, progress=False)
        assert part["num_videos"] == 1
    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest-0-of-2.json", "manifest-1-of-2.json"]
    opened = records.open_flow_records(out)
    assert opened.names == SEQUENCES and opened.video_ids.tolist() == [0, 1]
    single, parts = records.read_all_pairs(records.open_flow_records(exported)), records.read_all_pairs(opened)
    assert single.keys() == parts.keys() and all(np.array_equal(single[k], parts[k]) for k in single)
    (out / "manifest-1-of-2.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest-1-of-2.json"):
        records.open_flow_records(out)


def test_other_parameters_are_refused_unless_overwrite(davis_clips, tmp_path):
    out = tmp_path / "out"
    export.export_flows(davis_clips, out, CFG, progress=False)
    other = export.ExportConfig(**{**CFG.__dict__, "jpeg_quality": 80})
    before = _raw_records(out)
    differing = r"\(differing: jpeg_quality 95 \(now 80\)\)"
    with pytest.raises(ValueError, match=r"\.json was exported with other parameters " + differing):
        export.export_flows(davis_clips, out, other, progress=False)
    assert _raw_records(out) == before  # nothing lost
    manifest = export.export_flows(davis_clips, out, other, overwrite=True, progress=False)
    assert manifest["params"]["jpeg_quality"] == 80
    assert json.loads((out / "shard-0-of-1-00001.json").read_text())["params"]["jpeg_quality"] == 80


def test_corrupt_frame_stops_with_its_name_and_keeps_finished_shards(davis_clips, tmp_path):
    clips = tmp_path / "clips"
    shutil.copytree(davis_clips.parent, clips)
    bad = sorted((clips / SEQUENCES[1]).glob("*.jpg"))[3]
    bad.write_bytes(bad.read_bytes()[:2000])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"cannot decode image .*{bad.name}"):
        export.export_flows(clips / "list.txt", out, CFG, progress=False)
    assert (out / "shard-0-of-1-00000.json").is_file() and not (out / "manifest.json").exists()


def test_nonfinite_flows_are_counted(davis_clips, tmp_path):
    real = dis.DisFlow()

    def flow_with_nan(img1, img2):
        flow = real(img1, img2)
        flow[0, 3, 3, 0] = np.nan
        return flow

    manifest = export.export_flows(davis_clips, tmp_path, CFG, flow_fn=flow_with_nan, progress=False)
    batches_per_video = -(-(4 * NUM_FRAMES - 6) // CFG.batch_size)
    assert manifest["num_nonfinite_pairs"] == 2 * batches_per_video
    first_of_each_call = export._video_pairs(NUM_FRAMES, 2)[:: CFG.batch_size]
    assert manifest["nonfinite_pairs"] == [[v, t, p] for v in (0, 1) for t, p in first_of_each_call]


def test_flow_method_registry():
    flow = methods.make_flow_method("dis")
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 8:16, 8:16] = 255
    shifted = np.roll(image, 2, axis=2)
    result = flow(image, shifted)
    assert result.shape == (1, 32, 32, 2) and result.dtype == np.float32
    assert abs(result[0, 10:14, 10:14, 0].mean() - 2.0) < 0.5  # the square moved 2 px right
    with pytest.raises(ValueError, match="takes no checkpoint"):
        methods.make_flow_method("dis", checkpoint="x.pth")
    with pytest.raises(ValueError, match="needs --checkpoint"):
        methods.make_flow_method("searaft")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        methods.make_flow_method("searaft", checkpoint="nope.pth")
    with pytest.raises(ValueError, match="unknown flow method"):
        methods.make_flow_method("farneback")
    if importlib.util.find_spec("flowfeat_jax.flow.raft") is None:
        with pytest.raises(NotImplementedError, match="flow/raft.py"):
            methods.make_flow_method("raft", checkpoint=__file__)


def test_cli_exports_a_short_mp4(tmp_path):
    from test_videos import write_mp4

    write_mp4(tmp_path / "clip.mp4", 12)
    write_mp4(tmp_path / "short.mp4", 6)
    command = [sys.executable, str(REPO_ROOT / "tools" / "export_flow.py"), "--videos", str(tmp_path), "--out"]
    command += [str(tmp_path / "out"), "--method", "dis", "--frame-size", "48", "--flow-size", "32"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["num_videos"], manifest["num_frames"], manifest["num_pairs"]) == (1, 12, 42)
    assert manifest["skipped"] == ["short"] and manifest["num_skipped"] == 1

    result = subprocess.run(command + ["--gap", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "other parameters" in result.stderr and "gap" in result.stderr


def test_searaft_export_through_the_registry(tmp_path):
    torch = pytest.importorskip("torch")
    from flowfeat_jax.flow import searaft

    torch.manual_seed(0)
    checkpoint = tmp_path / "searaft_s_random.pth"
    torch.save(searaft.SeaRaft(searaft.SeaRaftConfig.from_variant("S")).state_dict(), checkpoint)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)  # 160 x 160, blocky texture
    (tmp_path / "clip").mkdir()
    for t in range(3):
        Image.fromarray(np.roll(base, 2 * t, axis=1)).save(tmp_path / "clip" / f"{t:03d}.png")
    cfg = export.ExportConfig(
        method="searaft", checkpoint=str(checkpoint), iters=1, gap=1, min_frames=3, frame_size=128, flow_size=128
    )
    manifest = export.export_flows(tmp_path / "clip", tmp_path / "out", cfg, progress=False)
    assert manifest["checkpoint_sha256"] == records.file_sha256(checkpoint) and manifest["num_pairs"] == 4
    flows = records.read_all_pairs(records.open_flow_records(tmp_path / "out"))
    frames = sorted((tmp_path / "clip").iterdir())
    squares = [np.asarray(export.square_frame(np.asarray(Image.open(p)), 128)) for p in frames]
    direct = searaft.SeaRaftFlow(checkpoint, iters=1)(np.stack(squares[:1]), np.stack(squares[1:2]))
    np.testing.assert_allclose(flows[(0, 0, 1)], direct[0] * (2 / 128), atol=2e-3, rtol=1e-3)
