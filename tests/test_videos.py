"""Video ingestion: the accepted layouts, PyAV decoding, short-video counting and bad input."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from flowfeat_jax.data import export, videos


def _write_frames(folder: pathlib.Path, count: int, size=(40, 32), suffix=".jpg", start=0) -> list[np.ndarray]:
    """Writes `count` frames (W, H) = size with a distinct flat colour each; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(count):
        frame = np.full((size[1], size[0], 3), (10 * i, 255 - 10 * i, 100), np.uint8)
        Image.fromarray(frame).save(folder / f"{start + i:05d}{suffix}")
        frames.append(frame)
    return frames


def write_mp4(path: pathlib.Path, count: int, size=(64, 48)) -> list[np.ndarray]:
    """A small H.264 mp4 written with PyAV: a bright square moving right by 2 px per frame over grey."""
    import av

    frames = []
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": "10"}
        for i in range(count):
            frame = np.full((size[1], size[0], 3), 90, np.uint8)
            frame[16:32, 4 + 2 * i : 20 + 2 * i] = 230
            frames.append(frame)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return frames


def test_davis_root_all_and_split(davis_root):
    listed = videos.list_videos(davis_root)
    names = sorted(p.name for p in (davis_root / "JPEGImages" / "480p").iterdir())
    assert [v.name for v in listed.videos] == names and listed.skipped == ()
    blackswan = next(v for v in listed.videos if v.name == "blackswan")
    assert blackswan.num_frames == len(list((davis_root / "JPEGImages/480p/blackswan").glob("*.jpg")))
    assert blackswan.frames[0].name < blackswan.frames[1].name

    train = (davis_root / "ImageSets" / "train.txt").read_text().split()
    by_suffix = videos.list_videos(f"{davis_root}:train")
    assert [v.name for v in by_suffix.videos] == train  # split-list order
    assert videos.list_videos(davis_root, split="train") == by_suffix
    with pytest.raises(FileNotFoundError, match="nosuchsplit.txt"):
        videos.list_videos(davis_root, split="nosuchsplit")


def test_official_davis2016_split_list_of_frame_paths(tmp_path):
    root = tmp_path / "DAVIS"
    for name in ("bear", "camel"):
        _write_frames(root / "JPEGImages" / "480p" / name, 10)
    lines = [f"/JPEGImages/480p/{n}/{i:05d}.jpg /Annotations/480p/{n}/{i:05d}.png"
             for n in ("camel", "bear") for i in (0, 5)]
    (root / "ImageSets" / "480p").mkdir(parents=True)
    (root / "ImageSets" / "480p" / "val.txt").write_text("\n".join(lines))
    assert [v.name for v in videos.list_videos(f"{root}:val").videos] == ["camel", "bear"]
    with pytest.raises(ValueError, match="split 'val' given but .*bear is neither"):
        videos.list_videos(f"{root / 'JPEGImages' / '480p' / 'bear'}:val")


def test_youtube_vos_layout_and_short_videos_counted(tmp_path):
    root = tmp_path / "ytvos"
    _write_frames(root / "train" / "JPEGImages" / "a1", 12)
    _write_frames(root / "train" / "JPEGImages" / "b2", 9)  # too short: skipped and named
    _write_frames(root / "valid" / "JPEGImages" / "c3", 10)
    listed = videos.list_videos(f"{root}:train")
    assert [v.name for v in listed.videos] == ["a1"] and listed.skipped == ("b2",)
    assert [v.name for v in videos.list_videos(f"{root}:valid").videos] == ["c3"]
    assert [v.name for v in videos.list_videos(root / "train").videos] == ["a1"]
    with pytest.raises(ValueError, match=r"6-fps YouTube-VOS frames train/JPEGImages but no train_all_frames.*:train"):
        videos.list_videos(root)  # the 6-fps frames only when asked for


def test_youtube_vos_root_defaults_to_all_frames_and_exports_them(tmp_path):
    """A root with both folders (recipe.md step 11): the 30-fps train_all_frames by default, train/ on request."""
    root = tmp_path / "ytvos"
    _write_frames(root / "train_all_frames" / "JPEGImages" / "a1", 15)
    _write_frames(root / "train_all_frames" / "JPEGImages" / "b2", 11)
    _write_frames(root / "train" / "JPEGImages" / "a1", 10)  # every 5th frame of the same video
    _write_frames(root / "train" / "JPEGImages" / "b2", 3)
    listed = videos.list_videos(root)
    assert [(v.name, v.num_frames) for v in listed.videos] == [("a1", 15), ("b2", 11)]
    assert all(f.parts[-4] == "train_all_frames" for v in listed.videos for f in v.frames)
    assert [(v.name, v.num_frames) for v in videos.list_videos(f"{root}:train").videos] == [("a1", 10)]
    cfg = export.ExportConfig(method="dis", frame_size=32, flow_size=16, gap=1, min_frames=3)
    flow = lambda a, b: np.zeros((*a.shape[:3], 2), np.float32)  # noqa: E731
    manifest = export.export_flows(root, tmp_path / "flow", cfg, flow_fn=flow, progress=False)
    assert (manifest["num_videos"], manifest["num_frames"]) == (2, 26)
    manifest = export.export_flows(f"{root}:train", tmp_path / "flow6", cfg, flow_fn=flow, progress=False)
    assert (manifest["num_videos"], manifest["num_frames"]) == (2, 13)


def test_folder_of_videos_file_list_and_mp4(tmp_path):
    folder = tmp_path / "kinetics"
    frames_a = _write_frames(folder / "clip_a", 11, suffix=".png")
    mp4_frames = write_mp4(folder / "clip_b.mp4", 12)
    (folder / "notes.txt").write_text("not a video")
    listed = videos.list_videos(folder)
    assert [(v.name, v.num_frames, v.is_file) for v in listed.videos] == [("clip_a", 11, False), ("clip_b", 12, True)]

    decoded = list(videos.iter_frames(listed.videos[1]))
    assert len(decoded) == 12 and decoded[0].shape == (48, 64, 3) and decoded[0].dtype == np.uint8
    for got, want in zip(decoded, mp4_frames, strict=True):  # lossy codec: the moving square stays where it was drawn
        assert np.abs(got.astype(int) - want).mean() < 4
    np.testing.assert_array_equal(np.stack(list(videos.iter_frames(listed.videos[0]))), np.stack(frames_a))

    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("# two videos\n../kinetics/clip_b.mp4\n\n" f"{folder / 'clip_a'}\n")
    from_list = videos.list_videos(tmp_path / "lists" / "train.txt")
    assert [v.path for v in from_list.videos] == [tmp_path / "lists/../kinetics/clip_b.mp4", folder / "clip_a"]

    (folder / "abseiling").mkdir()
    write_mp4(folder / "abseiling" / "clip_c.mp4", 10)  # Kinetics: <class>/<clip>.mp4
    assert [v.name for v in videos.list_videos(folder).videos] == ["abseiling/clip_c", "clip_a", "clip_b"]

    single = videos.list_videos(folder / "clip_b.mp4")
    assert [(v.name, v.num_frames) for v in single.videos] == [("clip_b", 12)]
    assert videos.list_videos(folder / "clip_a").videos[0].name == "clip_a"


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    folder = tmp_path / "vid"
    _write_frames(folder, 12)
    truncated = folder / "00003.jpg"
    truncated.write_bytes(truncated.read_bytes()[:60])
    (video,) = videos.list_videos(folder).videos
    with pytest.raises(ValueError, match="cannot decode image .*00003.jpg"):
        list(videos.iter_frames(video))
    truncated.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match="00003.jpg"):
        list(videos.iter_frames(video))


def test_frames_of_different_sizes_name_the_frame(tmp_path):
    folder = tmp_path / "vid"
    _write_frames(folder, 10)
    _write_frames(folder, 2, size=(40, 30), start=10)
    (video,) = videos.list_videos(folder).videos
    with pytest.raises(ValueError, match="00010.jpg is 40x30 but the video's first frame is 40x32"):
        list(videos.iter_frames(video))


def test_unreadable_video_file_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 500)
    with pytest.raises(ValueError, match="cannot read video file .*bad.mp4"):
        videos.list_videos(tmp_path / "bad.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos .* found under .*empty"):
        videos.list_videos(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nothere"):
        videos.list_videos(tmp_path / "nothere")
    (tmp_path / "list.txt").write_text("missing_video\n")
    with pytest.raises(FileNotFoundError, match="list.txt:1: .*missing_video"):
        videos.list_videos(tmp_path / "list.txt")
