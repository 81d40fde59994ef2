"""Reading DAVIS: sequence lists, frames, annotations and result PNGs, from the folder layout or from tfds.

Folder layout (DAVIS-2016 and DAVIS-2017 alike)::

    ROOT/JPEGImages/480p/<seq>/00000.jpg ...
    ROOT/Annotations/480p/<seq>/00000.png ...
    ROOT/ImageSets/2017/val.txt   (DAVIS-2017)   or   ROOT/ImageSets/val.txt   (DAVIS-2016)

Annotation encodings, both turned into integer label maps (0 = background, k = object k):
- DAVIS-2017: palette-index PNGs; index 255 is the void label and becomes background, as davis2017-evaluation
  (davis2017/davis.py `get_all_masks`) does for the semi-supervised task.
- DAVIS-2016: single-object greyscale masks with values 0/255; 255 becomes object 1.

Result PNGs are read the way davis2017-evaluation reads them (davis2017/results.py): the raw pixel values of a
palette or greyscale PNG are object indices.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from flowfeat_jax.data import videos

VOID_LABEL = 255


def davis_palette() -> np.ndarray:
    """The PASCAL VOC colour map DAVIS writes its palette PNGs with, (256, 3) uint8 (davis2017/utils.py color_map)."""
    index = np.arange(256)
    palette = np.zeros((256, 3), np.int64)
    # Bit 3j + c of the index sets bit 7 - j of colour channel c.
    for j in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * j + channel)) & 1) << (7 - j)
    return palette.astype(np.uint8)


def davis_input_size(height: int, width: int, multiple: int = 64, short_side: int = 480) -> tuple[int, int]:
    """Network input size (h, w) for a DAVIS frame: short side `short_side`, long side scaled to keep the aspect
    ratio and floored to a multiple of `multiple` (DINO eval_video_segmentation.py read_frame; 854x480 -> 832x480).

    The token grid must be even for the DPT (recipe, Model): with patch 16 the defaults give 30 x 52 tokens; with
    patch 14 pass multiple=56, short_side=476 (34 x 60 tokens).
    """
    if min(height, width) <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    long_side = max(height, width) * short_side / min(height, width)
    long_side = int(long_side // multiple) * multiple
    if long_side == 0:
        raise ValueError(f"frame {height}x{width} is too narrow for a long side that is a multiple of {multiple}")
    return (short_side, long_side) if height <= width else (long_side, short_side)


def list_sequences(root: str | pathlib.Path, split: str = "val") -> list[str]:
    """Sequence names of `split` from ImageSets/2017/<split>.txt (DAVIS-2017) or ImageSets/<split>.txt (2016)."""
    root = pathlib.Path(root)
    for candidate in (root / "ImageSets" / "2017" / f"{split}.txt", root / "ImageSets" / f"{split}.txt"):
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(f"no sequence list for split {split!r}: neither {root}/ImageSets/2017/{split}.txt "
                            f"nor {root}/ImageSets/{split}.txt exists")


def _sorted_files(folder: pathlib.Path, suffix: str) -> list[pathlib.Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    files = videos.frame_files(folder, (suffix,))  # natural order; a folder or unreadable entry among them is refused
    if not files:
        raise FileNotFoundError(f"no {suffix} files in {folder}")
    return files


def frame_paths(root: str | pathlib.Path, sequence: str, resolution: str = "480p") -> list[pathlib.Path]:
    """The sorted JPEG frames of one sequence."""
    return _sorted_files(pathlib.Path(root) / "JPEGImages" / resolution / sequence, ".jpg")


def annotation_paths(root: str | pathlib.Path, sequence: str, resolution: str = "480p") -> list[pathlib.Path]:
    """The sorted annotation PNGs of one sequence."""
    return _sorted_files(pathlib.Path(root) / "Annotations" / resolution / sequence, ".png")


def read_frames(root: str | pathlib.Path, sequence: str, resolution: str = "480p",
                max_frames: int | None = None) -> np.ndarray:
    """All (or the first `max_frames`) RGB frames of a sequence, (T, H, W, 3) uint8."""
    paths = frame_paths(root, sequence, resolution)[:max_frames]
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])


def annotation_to_labels(image: Image.Image) -> np.ndarray:
    """One ground-truth annotation as an (H, W) uint8 label map (see the module docstring for the encodings)."""
    labels = np.asarray(image)
    if labels.ndim != 2:
        raise ValueError(f"annotation must be a palette or greyscale PNG, got mode {image.mode}")
    if image.mode != "P" and np.isin(labels, (0, VOID_LABEL)).all():
        return (labels == VOID_LABEL).astype(np.uint8)  # DAVIS-2016 0/255 single-object mask
    return np.where(labels == VOID_LABEL, 0, labels).astype(np.uint8)


def read_annotation(path: str | pathlib.Path) -> np.ndarray:
    """Ground-truth label map (H, W) uint8 of one annotation PNG."""
    with Image.open(path) as image:
        try:
            return annotation_to_labels(image)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def read_annotations(root: str | pathlib.Path, sequence: str, resolution: str = "480p",
                     max_frames: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Ground-truth label maps (T, H, W) uint8 of a sequence and their frame ids ('00000', ...)."""
    paths = annotation_paths(root, sequence, resolution)[:max_frames]
    labels = [read_annotation(path) for path in paths]
    shapes = {label.shape for label in labels}
    if len(shapes) != 1:
        raise ValueError(f"annotations of {sequence} have different sizes {sorted(shapes)}")
    return np.stack(labels), [path.stem for path in paths]


def read_result_masks(results_dir: str | pathlib.Path, sequence: str, frame_ids: Sequence[str],
                      shape: tuple[int, int], max_id: int | None = None) -> np.ndarray:
    """Predicted label maps (T, H, W) uint8 from `results_dir/<seq>/<frame>.png` (palette or grey indices).

    Raises a one-line error naming the file when a frame is missing, has another size than `shape`, or holds an
    object id above `max_id` (the ground truth's object count).
    """
    masks = np.zeros((len(frame_ids), *shape), np.uint8)
    for index, frame_id in enumerate(frame_ids):
        path = pathlib.Path(results_dir) / sequence / f"{frame_id}.png"
        if not path.is_file():
            raise FileNotFoundError(f"result frame missing: {path}")
        with Image.open(path) as image:
            mask = np.asarray(image)
        if mask.ndim != 2:
            raise ValueError(f"{path}: result must be a palette or greyscale index PNG, got mode {image.mode}")
        if mask.shape != tuple(shape):
            raise ValueError(f"{path}: result size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from the "
                             f"annotation size {shape[1]}x{shape[0]}")
        if max_id is not None and mask.max() > max_id:
            raise ValueError(f"{path}: object id {mask.max()} but the ground truth of {sequence} has {max_id} "
                             f"object(s) (DAVIS-2016-style 0/255 results must be written as indices 0/1)")
        masks[index] = mask
    return masks


def write_index_png(path: str | pathlib.Path, labels: np.ndarray) -> None:
    """Write an (H, W) label map as a DAVIS palette PNG."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"{path}: labels must be an (H, W) map of ids 0..255, got shape {labels.shape}")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().ravel().tolist())
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def tfds_sequences(split: str = "validation", config: str = "480p", data_dir: str | None = None):
    """Yield (name, frames (T, H, W, 3) uint8, labels (T, H, W) uint8) from a prepared tfds `davis/<config>`.

    Uses `tfds.data_source` (random access over the prepared array_record files; no TensorFlow needed to read).
    The tfds builder stores `video/frames` and `video/segmentations` (T, H, W, 1) palette indices and
    `metadata/video_name`; indices 255 (void) become background as in the folder reader.
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415  (optional dependency, only for this source)
    import tensorflow_datasets.video.davis  # noqa: F401, PLC0415  (registers the builder; list_builders needs TF)

    source = tfds.data_source(f"davis/{config}", split=split, data_dir=data_dir)
    for example in source:
        name = example["metadata"]["video_name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        segmentations = np.asarray(example["video"]["segmentations"])[..., 0]
        labels = np.where(segmentations == VOID_LABEL, 0, segmentations).astype(np.uint8)
        yield name, np.asarray(example["video"]["frames"], np.uint8), labels
