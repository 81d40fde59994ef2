"""Flow exporter: videos -> square JPEG frames + teacher flows of every (t, t +- k) pair, in ArrayRecord shards.

Per video (recipe.md step 2; mirrors the reference dataloader.py ``DataVideo.__getitem__`` and model.py flow nets):
  1. each frame is resized so its short side is ``frame_size`` (PIL bilinear, as torchvision ``Resize(448)`` on a PIL
     image: long side ``int(frame_size * long / short)``) and centre-cropped to a square (torchvision ``CenterCrop``
     offsets ``int(round((side - frame_size) / 2))``); the square is stored once, as JPEG;
  2. the square is resized to ``flow_size`` (PIL bilinear, as ``Resize([224, 224])``) and the flow method computes the
     flow t -> partner in pixels for every partner with 0 < |partner - t| <= gap, pairs batched through it;
  3. the flow is stored in normalised units u * 2 / W, v * 2 / H as float16.
The record layout is documented in ``records.py``.

Robustness: a shard is written under ``*.tmp`` names and renamed when complete, then its ``shard-<tag>.json`` is
written atomically; a rerun keeps complete shards, discards temporaries and rewrites the rest, so an interrupted run
resumed gives the same records as an uninterrupted one. An output directory exported with other parameters is
refused unless ``overwrite``. Worker I of N takes videos I, I + N, ... of the sorted list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
from collections.abc import Callable, Mapping

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from flowfeat_jax.data import records, videos
from flowfeat_jax.flow import methods
from flowfeat_jax.progress import progress as progress_bar


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Exporter settings; defaults are the recipe's (gap 2, 448 frames, 224 flow)."""

    method: str = "searaft"
    checkpoint: str | None = None
    iters: int | None = None  # None = the method's recipe default
    gap: int = 2
    frame_size: int = 448
    flow_size: int = 224
    jpeg_quality: int = 95
    min_frames: int = videos.MIN_FRAMES
    device: str = "cpu"
    batch_size: int = 16  # pairs per flow-network call
    videos_per_shard: int = 32
    num_shards: int = 1  # exporter workers
    shard_index: int = 0  # this worker

    @classmethod
    def from_data_config(cls, data: Mapping) -> ExportConfig:
        """The export a training config's `data` section asks for (main exports `data.videos` on the fly): the
        fields of RUN_FIELDS under their own names, '' and 0 there meaning unset (None here: the method's default)."""
        values = {name: data[name] for name in RUN_FIELDS}
        return cls(**{**values, "checkpoint": values["checkpoint"] or None, "iters": values["iters"] or None})


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Short side -> ``size``, long side int(size * long / short), bilinear (torchvision Resize(int) on PIL)."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return image.resize(new_size, Image.BILINEAR)


def center_crop_square(image: Image.Image, size: int) -> Image.Image:
    """Centre ``size`` x ``size`` crop with torchvision CenterCrop's offsets."""
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def square_frame(frame: np.ndarray, frame_size: int) -> Image.Image:
    """uint8 RGB frame (H, W, 3) -> the square training frame (recipe.md step 2)."""
    return center_crop_square(resize_short_side(Image.fromarray(frame), frame_size), frame_size)


def pixels_to_normalised(flow: np.ndarray) -> np.ndarray:
    """Pixel flow (..., H, W, 2) -> normalised units u * 2 / W, v * 2 / H (model.py RaftFlow/SeaFlow)."""
    height, width = flow.shape[-3:-1]
    return flow * np.asarray([2.0 / width, 2.0 / height], np.float32)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG bytes without chroma subsampling (4:4:4): the frame is the encoder's input, keep its colour edges."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _export_params(cfg: ExportConfig, checkpoint_sha256: str | None, video_list: videos.VideoList) -> dict:
    """Everything that decides the records' content; two runs may share a directory only if these agree."""
    listing = "\n".join(f"{v.name}\t{v.num_frames}" for v in video_list.videos).encode()
    return {
        "format": records.FORMAT,
        "method": cfg.method,
        "checkpoint_sha256": checkpoint_sha256,
        "iters": cfg.iters,
        "gap": cfg.gap,
        "frame_size": cfg.frame_size,
        "flow_size": cfg.flow_size,
        "jpeg_quality": cfg.jpeg_quality,
        "min_frames": cfg.min_frames,
        "num_shards": cfg.num_shards,
        "videos_per_shard": cfg.videos_per_shard,
        "videos_sha256": hashlib.sha256(listing).hexdigest(),
    }


# Fields of an export's `params` that a run may ask for, with the ExportConfig field holding the requested value.
REQUESTABLE_PARAMS = ("method", "iters", "gap", "frame_size", "flow_size", "jpeg_quality")
# The ExportConfig fields a training config sets, as data.<field> (the checkpoint is compared by its hash).
RUN_FIELDS = (*REQUESTABLE_PARAMS, "checkpoint")


def export_mismatches(
    manifest: dict, cfg: ExportConfig, *, videos_spec: str | None = None, checkpoint_sha256: str | None = None
) -> list[tuple[str, object, object]]:
    """(field, value in the export, requested value) for every setting of `cfg` an existing export disagrees with;
    `videos_spec` and `checkpoint_sha256` are compared where given (the videos by absolute path)."""
    params = manifest.get("params", {})
    found = [(k, params.get(k), getattr(cfg, k)) for k in REQUESTABLE_PARAMS if params.get(k) != getattr(cfg, k)]
    if checkpoint_sha256 is not None and params.get("checkpoint_sha256") != checkpoint_sha256:
        found.append(("checkpoint", manifest.get("checkpoint"), cfg.checkpoint))
    exported = manifest.get("videos")
    if videos_spec and exported and os.path.abspath(exported) != os.path.abspath(videos_spec):
        found.append(("videos", exported, videos_spec))
    return found


def _check_config(cfg: ExportConfig) -> None:
    for name in ("frame_size", "flow_size", "batch_size", "videos_per_shard", "num_shards"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"shard_index {cfg.shard_index} not in [0, num_shards={cfg.num_shards})")
    if cfg.gap < 1 or cfg.min_frames < 2 * cfg.gap + 1:
        raise ValueError(f"need gap >= 1 and min_frames >= 2 * gap + 1, got gap={cfg.gap}, min_frames={cfg.min_frames}")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {cfg.jpeg_quality}")
    if cfg.flow_size > cfg.frame_size or cfg.flow_size < 8:
        raise ValueError(f"flow_size must be in [8, frame_size={cfg.frame_size}], got {cfg.flow_size}")


def _export_files(out_dir: pathlib.Path) -> list[pathlib.Path]:
    return [
        p
        for p in out_dir.iterdir()
        if p.name.startswith(("frames-", "flows-", "shard-", "manifest"))
        and p.suffix in (".array_record", ".json", ".tmp")
    ]


def _prepare_out_dir(out_dir: pathlib.Path, params: dict, cfg: ExportConfig, overwrite: bool) -> None:
    """Refuses (or with ``overwrite`` deletes) an export made with other parameters; drops this worker's temporaries
    (a half-written shard of an interrupted run) and, with ``overwrite``, all of this worker's files."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create output directory {out_dir}: {e.strerror or e}") from e
    tag_part = f"-{cfg.shard_index}-of-{cfg.num_shards}-"
    own_manifest = records.manifest_name(cfg.shard_index, cfg.num_shards)
    stale = []
    for path in _export_files(out_dir):
        if path.suffix == ".json":
            existing = records.read_json(path)
            if existing.get("params") != params:
                if not overwrite:
                    old = existing.get("params", {})
                    diff = [f"{k} {old.get(k)!r} (now {v!r})" for k, v in sorted(params.items()) if old.get(k) != v]
                    raise ValueError(
                        f"{path} was exported with other parameters (differing: {', '.join(diff)}); "
                        "use another output directory or --overwrite"
                    )
                stale.append(path)
    for path in _export_files(out_dir):
        if (tag_part in path.name or path.name.startswith(own_manifest)) and (overwrite or path.suffix == ".tmp"):
            stale.append(path)
    for path in stale:
        if path.name.startswith("shard-"):  # a stale shard takes its data files with it
            tag = path.name[len("shard-") : -len(".json")]
            for data in (f"frames-{tag}.array_record", f"flows-{tag}.array_record"):
                (out_dir / data).unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def _video_pairs(num_frames: int, gap: int) -> list[tuple[int, int]]:
    return [(t, p) for t in range(num_frames) for p in records.partners(t, num_frames, gap)]


def _write_shard(
    out_dir: pathlib.Path,
    tag: str,
    shard_videos: list[tuple[int, videos.Video]],
    cfg: ExportConfig,
    params: dict,
    flow_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    progress: tqdm.tqdm,
) -> dict:
    """Writes one shard (tmp names, then rename, then its json); returns the shard json."""
    frames_name, flows_name = f"frames-{tag}.array_record", f"flows-{tag}.array_record"
    frames_tmp, flows_tmp = out_dir / (frames_name + ".tmp"), out_dir / (flows_name + ".tmp")
    frame_writer = ArrayRecordWriter(str(frames_tmp), records.WRITER_OPTIONS)
    flow_writer = ArrayRecordWriter(str(flows_tmp), records.WRITER_OPTIONS)
    table, skipped, nonfinite = [], [], []
    frame_count = pair_count = 0
    try:
        for video_id, video in shard_videos:
            squares = [square_frame(frame, cfg.frame_size) for frame in videos.iter_frames(video)]
            if len(squares) < cfg.min_frames:  # a video file whose header over-stated its length
                skipped.append(video.name)
                progress.update(1)
                continue
            small = np.stack([np.asarray(s.resize((cfg.flow_size,) * 2, Image.BILINEAR)) for s in squares])
            for t, square in enumerate(squares):
                header = {"video": video_id, "name": video.name, "t": t}
                frame_writer.write(records.encode_record(header, encode_jpeg(square, cfg.jpeg_quality)))
            pairs = _video_pairs(len(squares), cfg.gap)
            for begin in range(0, len(pairs), cfg.batch_size):
                batch = pairs[begin : begin + cfg.batch_size]
                first, second = np.asarray(batch).T
                flows = np.asarray(flow_fn(small[first], small[second]), np.float32)
                if flows.shape != (len(batch), cfg.flow_size, cfg.flow_size, 2):
                    raise ValueError(f"flow method {cfg.method!r} returned {flows.shape} for {len(batch)} pairs")
                flows = pixels_to_normalised(flows)
                for (t, partner), flow in zip(batch, flows.astype(records.FLOW_DTYPE), strict=True):
                    if not np.isfinite(flow).all():
                        nonfinite.append([video_id, t, partner])
                    header = {"video": video_id, "t": t, "partner": partner, "method": cfg.method, "shape": flow.shape}
                    flow_writer.write(records.encode_record(header, flow.tobytes()))
            table.append(
                {
                    "video": video_id,
                    "name": video.name,
                    "num_frames": len(squares),
                    "frame_offset": frame_count,
                    "pair_offset": pair_count,
                }
            )
            frame_count += len(squares)
            pair_count += len(pairs)
            progress.update(1)
    finally:
        frame_writer.close()
        flow_writer.close()
    os.replace(frames_tmp, out_dir / frames_name)
    os.replace(flows_tmp, out_dir / flows_name)
    shard = {
        "params": params,
        "tag": tag,
        "frames_file": frames_name,
        "flows_file": flows_name,
        "frames_bytes": (out_dir / frames_name).stat().st_size,
        "flows_bytes": (out_dir / flows_name).stat().st_size,
        "num_videos": len(table),
        "num_frames": frame_count,
        "num_pairs": pair_count,
        "videos": table,
        "skipped": skipped,
        "nonfinite_pairs": nonfinite,
    }
    records.write_json_atomic(out_dir / f"shard-{tag}.json", shard)
    return shard


def _complete_shard(out_dir: pathlib.Path, tag: str, params: dict) -> dict | None:
    """The json of a shard finished by an earlier run (same parameters, data files intact), else None."""
    path = out_dir / f"shard-{tag}.json"
    if not path.is_file():
        return None
    shard = records.read_json(path)
    for name, size in ((shard["frames_file"], shard["frames_bytes"]), (shard["flows_file"], shard["flows_bytes"])):
        if not (out_dir / name).is_file() or (out_dir / name).stat().st_size != size:
            return None
    return shard if shard["params"] == params else None


def _no_usable_videos(videos_spec, skipped, min_frames: int) -> str:
    names = ", ".join(list(skipped)[:5]) + (", ..." if len(skipped) > 5 else "")
    return (f"no usable videos under {os.fspath(videos_spec)}: all {len(skipped)} have fewer than min_frames="
            f"{min_frames} frames ({names})")


def export_flows(
    videos_spec: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: ExportConfig,
    *,
    split: str | None = None,
    overwrite: bool = False,
    flow_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    progress: bool = True,
) -> dict:
    """Exports this worker's share of the videos under ``videos_spec`` to ``out_dir``; returns its manifest.

    Args:
      videos_spec: anything ``videos.list_videos`` accepts (``PATH`` or ``PATH:split``).
      out_dir: export directory (created).
      cfg: exporter settings.
      split: DAVIS / YouTube-VOS split (alternative to ``PATH:split``).
      overwrite: replace an export made with other parameters instead of refusing.
      flow_fn: flow method to use instead of ``make_flow_method(cfg.method, ...)`` (tests).
      progress: show a tqdm bar (videos/s, ETA).
    """
    _check_config(cfg)
    out_dir = pathlib.Path(out_dir)
    video_list = videos.list_videos(videos_spec, split=split, min_frames=cfg.min_frames)
    if not video_list.videos:
        raise ValueError(_no_usable_videos(videos_spec, video_list.skipped, cfg.min_frames))
    checkpoint_sha256 = records.file_sha256(cfg.checkpoint) if cfg.checkpoint else None
    params = _export_params(cfg, checkpoint_sha256, video_list)
    _prepare_out_dir(out_dir, params, cfg, overwrite)
    if flow_fn is None:
        flow_fn = methods.make_flow_method(cfg.method, cfg.checkpoint, device=cfg.device, iters=cfg.iters)

    mine = [(i, v) for i, v in enumerate(video_list.videos) if i % cfg.num_shards == cfg.shard_index]
    chunks = [mine[i : i + cfg.videos_per_shard] for i in range(0, len(mine), cfg.videos_per_shard)]
    shards = []
    with progress_bar(total=len(mine), unit="video", desc=f"export {cfg.method}", disable=not progress) as bar:
        for chunk_index, chunk in enumerate(chunks):
            tag = records.shard_tag(cfg.shard_index, cfg.num_shards, chunk_index)
            shard = _complete_shard(out_dir, tag, params)
            if shard is None:
                shard = _write_shard(out_dir, tag, chunk, cfg, params, flow_fn, bar)
            else:
                bar.update(len(chunk))
            shards.append({k: v for k, v in shard.items() if k != "params"})

    skipped = [n for i, n in enumerate(video_list.skipped) if i % cfg.num_shards == cfg.shard_index]
    skipped += [n for s in shards for n in s["skipped"]]
    if mine and not any(s["num_videos"] for s in shards):  # every video decoded shorter than its header said
        raise ValueError(_no_usable_videos(videos_spec, skipped, cfg.min_frames))
    manifest = {
        "method": cfg.method,
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": checkpoint_sha256,
        "videos": os.fspath(videos_spec),
        "split": split,
        "params": params,
        "shard_index": cfg.shard_index,
        "num_shards": cfg.num_shards,
        "shards": shards,
        "num_videos": sum(s["num_videos"] for s in shards),
        "num_frames": sum(s["num_frames"] for s in shards),
        "num_pairs": sum(s["num_pairs"] for s in shards),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_nonfinite_pairs": sum(len(s["nonfinite_pairs"]) for s in shards),
        "nonfinite_pairs": [p for s in shards for p in s["nonfinite_pairs"]],
    }
    records.write_json_atomic(out_dir / records.manifest_name(cfg.shard_index, cfg.num_shards), manifest)
    return manifest
