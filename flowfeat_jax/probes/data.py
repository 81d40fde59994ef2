"""Data for the dense probes: COCO-Stuff-27 (folder) and NYUv2 depth (folder or a prepared tfds `nyu_depth_v2`).

COCO-Stuff folder (the files of github.com/nightrome/cocostuff: train2017.zip / val2017.zip and
stuffthingmaps_trainval2017.zip)::

    <root>/images/{train2017,val2017}/<id>.jpg
    <root>/stuffthingmaps_trainval2017/{train2017,val2017}/<id>.png   (or <root>/annotations/<split>/<id>.png)

Label PNGs hold fine ids 0..181 (COCO-Stuff label id - 1) and 255 for unlabelled pixels. An optional image list (one
id per line, e.g. the curated `Coco164kFull_Stuff_Coarse.txt` of the PiCIE/STEGO protocol) selects a subset.

NYUv2 folder (any RGB/depth pairs with matching file stems)::

    <root>/<split>/rgb/<name>.png|.jpg
    <root>/<split>/depth/<name>.png    16-bit, millimetres (0 = no measurement)
                       or <name>.npy   float, metres (0, NaN or inf = no measurement)

tfds: `tfds.data_source("nyu_depth_v2", split=...)` after `tfds build nyu_depth_v2` (splits 'train' and
'validation' = the 654 official test images; image (480, 640, 3) uint8, depth (480, 640) float16 metres).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

IGNORE_LABEL = 255

# --- COCO-Stuff-27 ----------------------------------------------------------------------------------------------
# The 27 coarse classes are the 12 thing and 15 stuff supercategories of the COCO-Stuff label hierarchy
# (Caesar et al., CVPR 2018; github.com/nightrome/cocostuff labels.txt and cocostuffhierarchy), in the index order of
# the COCO-Stuff-27 unsupervised-segmentation protocol (Cho et al. PiCIE, CVPR 2021; Hamilton et al. STEGO, ICLR 2022).
COARSE_CLASSES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip

# Things: COCO ids 1..91 (fine ids 0..90) in id order, grouped by supercategory. Names in brackets are the 11 COCO
# ids without annotations; they never occur in the maps but keep the fine ids aligned.
_THING_GROUPS = (
    ("person", ("person",)),
    ("vehicle", ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat")),
    ("outdoor", ("traffic light", "fire hydrant", "[street sign]", "stop sign", "parking meter", "bench")),
    ("animal", ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")),
    ("accessory", ("[hat]", "backpack", "umbrella", "[shoe]", "[eye glasses]", "handbag", "tie", "suitcase")),
    ("sports", ("frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
                "surfboard", "tennis racket")),
    ("kitchen", ("bottle", "[plate]", "wine glass", "cup", "fork", "knife", "spoon", "bowl")),
    ("food-things", ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
                     "cake")),
    ("furniture-things", ("chair", "couch", "potted plant", "bed", "[mirror]", "dining table", "[window]", "[desk]",
                          "toilet", "[door]")),
    ("electronic", ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone")),
    ("appliance", ("microwave", "oven", "toaster", "sink", "refrigerator", "[blender]")),
    ("indoor", ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "[hair brush]")),
)  # fmt: skip

# Stuff: COCO-Stuff ids 92..182 (fine ids 91..181), alphabetical as in labels.txt, with their supercategory.
_STUFF_CLASSES = (
    ("banner", "textile"), ("blanket", "textile"), ("branch", "plant"), ("bridge", "building"),
    ("building-other", "building"), ("bush", "plant"), ("cabinet", "furniture-stuff"), ("cage", "structural"),
    ("cardboard", "rawmaterial"), ("carpet", "floor"), ("ceiling-other", "ceiling"), ("ceiling-tile", "ceiling"),
    ("cloth", "textile"), ("clothes", "textile"), ("clouds", "sky"), ("counter", "furniture-stuff"),
    ("cupboard", "furniture-stuff"), ("curtain", "textile"), ("desk-stuff", "furniture-stuff"), ("dirt", "ground"),
    ("door-stuff", "furniture-stuff"), ("fence", "structural"), ("floor-marble", "floor"), ("floor-other", "floor"),
    ("floor-stone", "floor"), ("floor-tile", "floor"), ("floor-wood", "floor"), ("flower", "plant"), ("fog", "water"),
    ("food-other", "food-stuff"), ("fruit", "food-stuff"), ("furniture-other", "furniture-stuff"), ("grass", "plant"),
    ("gravel", "ground"), ("ground-other", "ground"), ("hill", "solid"), ("house", "building"), ("leaves", "plant"),
    ("light", "furniture-stuff"), ("mat", "textile"), ("metal", "rawmaterial"), ("mirror-stuff", "furniture-stuff"),
    ("moss", "plant"), ("mountain", "solid"), ("mud", "ground"), ("napkin", "textile"), ("net", "structural"),
    ("paper", "rawmaterial"), ("pavement", "ground"), ("pillow", "textile"), ("plant-other", "plant"),
    ("plastic", "rawmaterial"), ("platform", "ground"), ("playingfield", "ground"), ("railing", "structural"),
    ("railroad", "ground"), ("river", "water"), ("road", "ground"), ("rock", "solid"), ("roof", "building"),
    ("rug", "textile"), ("salad", "food-stuff"), ("sand", "ground"), ("sea", "water"), ("shelf", "furniture-stuff"),
    ("sky-other", "sky"), ("skyscraper", "building"), ("snow", "ground"), ("solid-other", "solid"),
    ("stairs", "furniture-stuff"), ("stone", "solid"), ("straw", "plant"), ("structural-other", "structural"),
    ("table", "furniture-stuff"), ("tent", "building"), ("textile-other", "textile"), ("towel", "textile"),
    ("tree", "plant"), ("vegetable", "food-stuff"), ("wall-brick", "wall"), ("wall-concrete", "wall"),
    ("wall-other", "wall"), ("wall-panel", "wall"), ("wall-stone", "wall"), ("wall-tile", "wall"),
    ("wall-wood", "wall"), ("water-other", "water"), ("waterdrops", "water"), ("window-blind", "window"),
    ("window-other", "window"), ("wood", "solid"),
)  # fmt: skip

FINE_CLASSES = tuple((name, coarse) for coarse, names in _THING_GROUPS for name in names) + _STUFF_CLASSES
NUM_FINE_CLASSES = len(FINE_CLASSES)  # 182
NUM_COARSE_CLASSES = len(COARSE_CLASSES)  # 27
_INVALID = -1


def fine_to_coarse_table() -> np.ndarray:
    """Lookup (256,) int: fine id -> coarse id 0..26, 255 -> 255, every other value -> -1 (not a COCO-Stuff id)."""
    table = np.full(256, _INVALID, np.int64)
    table[:NUM_FINE_CLASSES] = [COARSE_CLASSES.index(coarse) for _, coarse in FINE_CLASSES]
    table[IGNORE_LABEL] = IGNORE_LABEL
    return table


_FINE_TO_COARSE = fine_to_coarse_table()


def coarse_labels(fine: np.ndarray, source: str = "labels") -> np.ndarray:
    """Map a fine COCO-Stuff label map (values 0..181, 255 unlabelled) to the 27 coarse classes (uint8, 255 kept)."""
    fine = np.asarray(fine)
    if fine.ndim != 2 or not np.issubdtype(fine.dtype, np.integer):
        raise ValueError(f"{source}: expected an (H, W) integer label map, got {fine.dtype} {fine.shape}")
    if fine.min(initial=0) < 0 or fine.max(initial=0) > 255:
        raise ValueError(f"{source}: label values must be 0..181 or 255, found {fine.min()}..{fine.max()}")
    coarse = _FINE_TO_COARSE[fine]
    if (coarse == _INVALID).any():
        bad = np.unique(fine[coarse == _INVALID])[:8].tolist()
        raise ValueError(f"{source}: not COCO-Stuff fine class ids (0..181, 255 = unlabelled): {bad}")
    return coarse.astype(np.uint8)


def resize_square(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize the short side to `size`, then centre-crop a size x size square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _require_dir(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} folder not found")
    return path


class CocoStuffFolder:
    """COCO-Stuff images and stuffthingmaps of one split; `load(i, size)` gives a square image and coarse labels."""

    LABEL_DIRS = ("stuffthingmaps_trainval2017", "annotations")

    def __init__(self, root: str | pathlib.Path, split: str = "val2017", image_list: str | None = None):
        root = _require_dir(pathlib.Path(root), "COCO-Stuff root")
        self.image_dir = _require_dir(root / "images" / split, "COCO-Stuff images")
        label_dirs = [root / name / split for name in self.LABEL_DIRS if (root / name / split).is_dir()]
        if not label_dirs:
            raise FileNotFoundError(f"{root}: no label folder {' or '.join(n + '/' + split for n in self.LABEL_DIRS)}")
        self.label_dir = label_dirs[0]
        if image_list:
            list_path = pathlib.Path(image_list)
            if not list_path.is_file():
                raise FileNotFoundError(f"{list_path}: image list not found")
            self.ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        else:
            self.ids = sorted(p.stem for p in self.label_dir.glob("*.png"))
        if not self.ids:
            raise FileNotFoundError(f"{self.label_dir}: no label PNGs")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int, size: int, crop: int | None = None) -> dict[str, np.ndarray]:
        """The centre `crop` x `crop` square (short side resized; default `size`): labels (nearest) at that side, the
        image resized (bilinear) on to the network input `size`."""
        image_path = self.image_dir / f"{self.ids[index]}.jpg"
        label_path = self.label_dir / f"{self.ids[index]}.png"
        for path in (image_path, label_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing COCO-Stuff file")
        image, label = Image.open(image_path).convert("RGB"), Image.open(label_path)
        if image.size != label.size:
            raise ValueError(f"{label_path}: label size {label.size} differs from image size {image.size}")
        labels = coarse_labels(np.asarray(label), str(label_path))
        crop = crop or size
        square = resize_square(image, crop, Image.BILINEAR)
        return {
            "image": np.asarray(square if crop == size else square.resize((size, size), Image.BILINEAR)),
            "labels": np.asarray(resize_square(Image.fromarray(labels), crop, Image.NEAREST)),
        }


# --- NYUv2 depth ------------------------------------------------------------------------------------------------
# Eigen et al. (NIPS 2014) evaluation crop of the 480 x 640 NYUv2 frames: rows 45..470, columns 41..600 (AdaBins
# evaluate.py, BTS and most NYUv2 papers), kept as fractions so other frame sizes scale it.
EIGEN_CROP_480x640 = (45, 471, 41, 601)  # top, bottom (exclusive), left, right (exclusive)


def eigen_mask(height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of the Eigen evaluation crop, scaled from the 480 x 640 pixel bounds."""
    top, bottom, left, right = EIGEN_CROP_480x640
    mask = np.zeros((height, width), bool)
    rows = slice(round(top * height / 480), round(bottom * height / 480))
    cols = slice(round(left * width / 640), round(right * width / 640))
    mask[rows, cols] = True
    return mask


def read_depth(path: pathlib.Path) -> np.ndarray:
    """Depth in metres (float32): 16-bit PNG in millimetres or .npy in metres; NaN/inf/negative become 0 (invalid)."""
    if path.suffix == ".npy":
        depth = np.load(path).astype(np.float32)
    else:
        image = Image.open(path)
        if image.mode not in ("I;16", "I;16B", "I"):
            raise ValueError(f"{path}: depth PNG must be 16-bit millimetres, got PIL mode {image.mode}")
        depth = np.asarray(image, np.float32) / 1000.0
    if depth.ndim != 2:
        raise ValueError(f"{path}: depth must be an (H, W) map, got shape {depth.shape}")
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


class NyuFolder:
    """RGB/depth pairs under <root>/<split>/{rgb,depth}; `load(i)` gives uint8 (H, W, 3) and metres (H, W)."""

    def __init__(self, root: str | pathlib.Path, split: str = "test"):
        base = _require_dir(pathlib.Path(root) / split, "NYUv2 split")
        rgb_dir, depth_dir = _require_dir(base / "rgb", "NYUv2 rgb"), _require_dir(base / "depth", "NYUv2 depth")
        self.rgb = sorted(p for p in rgb_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not self.rgb:
            raise FileNotFoundError(f"{rgb_dir}: no .png/.jpg images")
        self.depth = []
        for rgb in self.rgb:
            candidates = [depth_dir / f"{rgb.stem}{ext}" for ext in (".png", ".npy")]
            found = [p for p in candidates if p.is_file()]
            if not found:
                raise FileNotFoundError(f"{candidates[0]}: missing depth for {rgb.name} (.png mm or .npy metres)")
            self.depth.append(found[0])

    def __len__(self) -> int:
        return len(self.rgb)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(Image.open(self.rgb[index]).convert("RGB")), read_depth(self.depth[index])


class NyuTfds:
    """A prepared tfds `nyu_depth_v2` split read through `tfds.data_source` (no TensorFlow needed)."""

    def __init__(self, split: str = "validation", data_dir: str | None = None):
        import tensorflow_datasets as tfds  # noqa: PLC0415  (optional dependency, only for this source)

        # Registers the builder directly; tfds.list_builders / the registry scan needs TensorFlow.
        import tensorflow_datasets.datasets.nyu_depth_v2.nyu_depth_v2_dataset_builder  # noqa: F401, PLC0415

        self.source = tfds.data_source("nyu_depth_v2", split=split, data_dir=data_dir or None)

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        example = self.source[index]
        depth = np.asarray(example["depth"], np.float32)
        depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
        return np.asarray(example["image"], np.uint8), depth


def nyu_sample(image: np.ndarray, depth: np.ndarray, crop: int, input_size: int, source: str = "") -> dict:
    """Centre crop (crop x crop) of image, depth and the Eigen mask; the image is also resized to the model input.

    Returns image (input_size, input_size, 3) uint8, depth (crop, crop) float32 metres (0 = invalid) and eigen
    (crop, crop) bool. The paper evaluates at 480 x 480: the centre square of the 480 x 640 frame.
    """
    if image.ndim != 3 or image.shape[:2] != depth.shape:
        raise ValueError(f"{source}: image {image.shape} and depth {depth.shape} sizes differ")
    height, width = depth.shape
    if min(height, width) < crop:
        raise ValueError(f"{source}: frame {height}x{width} is smaller than the {crop}x{crop} evaluation crop")
    top, left = (height - crop) // 2, (width - crop) // 2
    window = (slice(top, top + crop), slice(left, left + crop))
    resized = Image.fromarray(image[window]).resize((input_size, input_size), Image.BILINEAR)
    return {"image": np.asarray(resized), "depth": depth[window], "eigen": eigen_mask(height, width)[window]}


# --- batching ---------------------------------------------------------------------------------------------------
def batches(
    load: Callable[[int], dict[str, np.ndarray]],
    num_items: int,
    batch_size: int,
    *,
    seed: int | None = None,
    start_batch: int = 0,
    num_workers: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Stacked batches of `load(i)` dicts, plus "index" (B,).

    seed None: one pass in order (the last batch may be smaller). Otherwise an endless stream of reshuffled epochs
    (numpy Generator seeded with (seed, epoch)); `start_batch` skips that many batches, so a resumed run sees the same
    sequence.
    """
    if num_items <= 0:
        raise ValueError("the dataset is empty")

    def order() -> Iterator[Sequence[int]]:
        if seed is None:
            for start in range(0, num_items, batch_size):
                yield range(start, min(start + batch_size, num_items))
            return
        per_epoch = max(1, num_items // batch_size)
        epoch, skip = divmod(start_batch, per_epoch)
        while True:
            perm = np.random.default_rng((seed, epoch)).permutation(num_items)
            if num_items < batch_size:
                perm = np.resize(perm, batch_size * per_epoch)
            for b in range(skip, per_epoch):
                yield perm[b * batch_size : (b + 1) * batch_size]
            epoch, skip = epoch + 1, 0

    def collect(indices, futures) -> dict[str, np.ndarray]:
        items = [future.result() for future in futures]
        batch = {key: np.stack([item[key] for item in items]) for key in items[0]}
        batch["index"] = np.asarray(indices, np.int32)
        return batch

    # One batch ahead: the next batch loads in the worker threads while the caller uses the current one.
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        pending = None
        for indices in order():
            futures = [pool.submit(load, int(i)) for i in indices]
            if pending is not None:
                yield collect(*pending)
            pending = (indices, futures)
        if pending is not None:
            yield collect(*pending)
