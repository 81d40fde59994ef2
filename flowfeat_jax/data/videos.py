"""Video ingestion: find the videos under a path and decode their frames.

A video is either a folder of frames (``.jpg``/``.jpeg``/``.png`` in natural order: ``2.jpg`` before ``10.jpg``) or a
video file (``.mp4``/``.webm``/``.avi``/``.mkv``/``.mov``, decoded with PyAV). ``list_videos`` accepts

- one video (a frame folder or a video file);
- a folder of videos (frame folders or video files) one level down, or two where the first level holds only
  folders (Kinetics-style ``<class>/<clip>.mp4``);
- a DAVIS root (``JPEGImages/480p/<seq>``, optionally restricted to the sequences of ``ImageSets/<split>.txt``; also
    the DAVIS-2017 ``ImageSets/2017/<split>.txt`` layout);
- a YouTube-VOS / YouTube-VIS root (``<split>/JPEGImages/<id>``) or one split folder of it (``.../train`` holding
    ``JPEGImages``). Without a split a root gives ``train_all_frames`` (the 30-fps frames the reference trains on,
    recipe.md step 11); the 6-fps ``train`` folder only when asked for, as ``ROOT:train``;
- a text file list, one video path per line (relative paths are taken from the list's folder; blank lines and
    ``#`` comments ignored).

A split can be given as ``PATH:split`` or with ``split=``. As in the reference ``dataloader.py`` (``DataVideo``),
videos with fewer than ``min_frames`` (10) frames are skipped; they are returned in ``VideoList.skipped`` so callers
can count and report them. Video files are probed (container header; decoded only where the header has no frame
count) to know their length up front.
"""

import collections
import dataclasses
import os
import pathlib
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")
MIN_FRAMES = 10  # reference dataloader.py skips videos with fewer frames
YTVOS_ALL_FRAMES = "train_all_frames"  # YouTube-VOS 2019 at 30 fps (reference train_ytvos_all.txt)


@dataclasses.dataclass(frozen=True)
class Video:
    """One video: ``name`` is its id (path relative to the listed root), ``frames`` the sorted frame files for a frame
    folder (empty for a video file), ``num_frames`` its length."""

    name: str
    path: pathlib.Path
    frames: tuple[pathlib.Path, ...]
    num_frames: int

    @property
    def is_file(self) -> bool:
        return not self.frames


@dataclasses.dataclass(frozen=True)
class VideoList:
    """Videos kept (in listing order) and the names of those skipped for having fewer than ``min_frames`` frames."""

    videos: tuple[Video, ...]
    skipped: tuple[str, ...]


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers inside a name by value: 1.jpg, 2.jpg, ..., 10.jpg (and zero-padded names
    as before); text runs compare case-sensitively, as plain sorting does."""
    return tuple((1, int(part), part) if part.isdigit() else (0, 0, part) for part in re.split(r"(\d+)", name))


def frame_files(folder: pathlib.Path, suffixes: tuple[str, ...] = FRAME_SUFFIXES) -> list[pathlib.Path]:
    """The frame files (`suffixes`, any case) of a folder in natural order (`natural_key`), the one reader of a frame
    folder (export, DAVIS, extraction). A folder holding frames must hold nothing else that could be one: a
    subfolder, or an entry with a frame suffix that is not a readable file (broken link, no permission), would
    silently shift every t +- k pair after it, so it is refused, naming it."""
    entries = sorted(folder.iterdir(), key=lambda p: natural_key(p.name))
    frames = [p for p in entries if p.suffix.lower() in suffixes and p.is_file() and os.access(p, os.R_OK)]
    if frames:
        odd = [p for p in entries if p.is_dir() or (p.suffix.lower() in suffixes and p not in frames)]
        if odd:
            what = "a folder" if odd[0].is_dir() else "an unreadable entry (broken link or no read permission)"
            raise ValueError(f"{odd[0]} is {what} among the frames of {folder}; move it out (frames must be files)")
    return frames


def _frame_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Frame files of a candidate video folder; [] for a folder of videos (Kinetics class folders and the like)."""
    entries = list(folder.iterdir())
    if not any(p.suffix.lower() in FRAME_SUFFIXES and not p.is_dir() for p in entries):
        return []
    return frame_files(folder)


def _is_video_file(path: pathlib.Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


def _open_container(path: pathlib.Path):
    import av  # noqa: PLC0415  (PyAV only where video files are used)

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"cannot read video file {path}: {e}") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"video file {path} has no video stream")
    return container


def count_video_file_frames(path: pathlib.Path) -> int:
    """Frame count of a video file: the container header's when it has one, else by decoding."""
    import av  # noqa: PLC0415  (PyAV only where video files are used)

    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        try:
            return sum(1 for _ in container.decode(stream))
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode video file {path}: {e}") from e
    finally:
        container.close()


def _make_video(path: pathlib.Path, name: str) -> Video:
    if _is_video_file(path):
        return Video(name=name, path=path, frames=(), num_frames=count_video_file_frames(path))
    frames = tuple(_frame_files(path))
    return Video(name=name, path=path, frames=frames, num_frames=len(frames))


def _videos_in_folder(folder: pathlib.Path, prefix: str = "", depth: int = 2) -> list[Video]:
    """Frame folders and video files below ``folder``: one level down, or two inside subfolders that hold no frames
    themselves (Kinetics' ``<class>/<clip>.mp4``, named ``<class>/<clip>``)."""
    videos = []
    for child in sorted(folder.iterdir()):
        if _is_video_file(child) or (child.is_dir() and _frame_files(child)):
            videos.append(_make_video(child, prefix + (child.stem if child.is_file() else child.name)))
        elif child.is_dir() and depth > 1:
            videos.extend(_videos_in_folder(child, f"{prefix}{child.name}/", depth - 1))
    return videos


def _davis_split_names(root: pathlib.Path, split: str) -> list[str]:
    """Sequence names of a DAVIS split list, in list order: one name per line (``ImageSets/<split>.txt``,
    ``ImageSets/2017/<split>.txt``) or one frame path per line (``/JPEGImages/480p/<seq>/00000.jpg /Annotations/...``,
    official DAVIS 2016 ``ImageSets/480p/<split>.txt``)."""
    for folder in ("", "2017", "480p"):
        candidate = root / "ImageSets" / folder / f"{split}.txt"
        if candidate.is_file():
            lines = [line for line in candidate.read_text().splitlines() if line.strip()]
            entries = [pathlib.PurePosixPath(line.split()[0]) for line in lines]
            names = (e.parent.name if e.suffix.lower() in FRAME_SUFFIXES else e.name for e in entries)
            return list(dict.fromkeys(names))
    raise FileNotFoundError(f"DAVIS split list not found: {root / 'ImageSets' / f'{split}.txt'}")


def _list_davis(root: pathlib.Path, split: str | None) -> list[Video]:
    frames_root = root / "JPEGImages" / "480p"
    if split is None:
        return _videos_in_folder(frames_root)
    videos = []
    for name in _davis_split_names(root, split):
        folder = frames_root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"sequence {name!r} of split {split!r} has no frame folder {folder}")
        videos.append(_make_video(folder, name))
    return videos


def _list_file_list(list_file: pathlib.Path) -> list[Video]:
    videos = []
    for line_number, line in enumerate(list_file.read_text().splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        path = pathlib.Path(entry.split()[0])  # reference file lists may carry a second (mask) column
        path = path if path.is_absolute() else list_file.parent / path
        if not (path.is_dir() or _is_video_file(path)):
            raise FileNotFoundError(f"{list_file}:{line_number}: {path} is neither a frame folder nor a video file")
        videos.append(_make_video(path, entry.split()[0]))
    return videos


def parse_videos_spec(spec: str | os.PathLike, split: str | None = None) -> tuple[pathlib.Path, str | None]:
    """Splits ``PATH:split`` into (path, split); a path that exists as given is never split."""
    text = os.fspath(spec)
    if not os.path.exists(text) and ":" in text:
        text, split_in_spec = text.rsplit(":", 1)
        if split is not None and split != split_in_spec:
            raise ValueError(f"two splits given: {split_in_spec!r} in {spec!r} and split={split!r}")
        split = split_in_spec
    path = pathlib.Path(text)
    if not path.exists():
        raise FileNotFoundError(f"videos path not found: {path}")
    return path, split


def list_videos(spec: str | os.PathLike, split: str | None = None, min_frames: int = MIN_FRAMES) -> VideoList:
    """Lists the videos under ``spec`` (see the module docstring for the accepted layouts): in the order of the text
    list or split list where there is one, else sorted by name.

    Raises:
        FileNotFoundError: the path, a split list or a listed video is missing.
        ValueError: no video found under the path, or a video file cannot be read.
    """
    path, split = parse_videos_spec(spec, split)
    if split is not None and not ((path / "JPEGImages" / "480p").is_dir() or (path / split / "JPEGImages").is_dir()):
        raise ValueError(f"split {split!r} given but {path} is neither a DAVIS root nor a YouTube-VOS root with it")
    if path.is_file() and not _is_video_file(path):
        videos = _list_file_list(path)
    elif _is_video_file(path):
        videos = [_make_video(path, path.stem)]
    elif (path / "JPEGImages" / "480p").is_dir():
        videos = _list_davis(path, split)
    elif (path / (split or YTVOS_ALL_FRAMES) / "JPEGImages").is_dir():
        videos = _videos_in_folder(path / (split or YTVOS_ALL_FRAMES) / "JPEGImages")
    elif split is None and (path / "train" / "JPEGImages").is_dir():
        raise ValueError(
            f"{path} holds the 6-fps YouTube-VOS frames train/JPEGImages but no {YTVOS_ALL_FRAMES}/JPEGImages (the "
            f"30-fps frames the paper trains on): add them, or ask for the 6-fps ones with {path}:train"
        )
    elif (path / "JPEGImages").is_dir():
        videos = _videos_in_folder(path / "JPEGImages")
    elif _frame_files(path):
        videos = [_make_video(path, path.name)]
    else:
        videos = _videos_in_folder(path)
    if not videos:
        raise ValueError(f"no videos (frame folders or {'/'.join(VIDEO_SUFFIXES)} files) found under {path}")
    duplicates = sorted(name for name, count in collections.Counter(v.name for v in videos).items() if count > 1)
    if duplicates:
        raise ValueError(f"duplicate video names under {path}: {duplicates[:5]}")
    kept = tuple(v for v in videos if v.num_frames >= min_frames)
    skipped = tuple(v.name for v in videos if v.num_frames < min_frames)
    return VideoList(videos=kept, skipped=skipped)


# PIL modes of 16-bit samples; convert("RGB") clips them at 255 instead of scaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def image_to_rgb(image: Image.Image, path: str | os.PathLike) -> np.ndarray:
    """An opened image as uint8 RGB (H, W, 3), by its real bit depth: 16-bit greyscale (PNG, TIFF) is scaled by
    255 / 65535; 32-bit integer or float images have no fixed range and are refused (ValueError naming `path`)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        samples = np.asarray(image).astype(np.uint32)
        grey = ((samples * 255 + 32767) // 65535).astype(np.uint8)  # rounded to the nearest 8-bit level
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("I", "F"):
        raise ValueError(f"{path}: {'32-bit integer' if image.mode == 'I' else 'floating-point'} image (mode "
                         f"{image.mode}) has no fixed value range; save frames as 8- or 16-bit PNG or JPEG")
    return np.asarray(image.convert("RGB"))


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """One image file as uint8 RGB (H, W, 3) (`image_to_rgb`); ValueError naming the file when it cannot be decoded."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated / corrupt files as OSError or SyntaxError
        raise ValueError(f"cannot decode image {path}: {e}") from e
    with image:
        return image_to_rgb(image, path)


def iter_frames(video: Video) -> Iterator[np.ndarray]:
    """Yields the frames of ``video`` as uint8 RGB arrays (H, W, 3).

    Raises:
        ValueError: a frame cannot be decoded, or its size differs from the first frame's (naming the file or frame).
    """
    first_shape = None
    if video.is_file:
        import av  # noqa: PLC0415  (PyAV only where video files are used)

        container = _open_container(video.path)
        try:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                array = frame.to_ndarray(format="rgb24")
                first_shape = first_shape or array.shape
                if array.shape != first_shape:
                    raise ValueError(
                        f"frame {index} of {video.path} is {array.shape[1]}x{array.shape[0]} but the first frame is "
                        f"{first_shape[1]}x{first_shape[0]}"
                    )
                yield array
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode video file {video.path}: {e}") from e
        finally:
            container.close()
        return
    for path in video.frames:
        array = read_rgb(path)
        first_shape = first_shape or array.shape
        if array.shape != first_shape:
            raise ValueError(
                f"frame {path} is {array.shape[1]}x{array.shape[0]} but the video's first frame is "
                f"{first_shape[1]}x{first_shape[0]}: frames of one video must share one size"
            )
        yield array
