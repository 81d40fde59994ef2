"""On-disk layout of exported flow records, and the reader that opens an export directory.

An export directory holds, per exporter worker I of N (``tools/export_flow.py --shard-index I --num-shards N``),
shards tagged ``I-of-N-JJJJJ`` (whole videos each, never split across shards), each shard as two ArrayRecord files:

- ``frames-<tag>.array_record``: one record per frame, in video order then t = 0..T-1. Payload: the square frame
  (short side resized to frame_size, centre square crop; recipe.md step 2) as JPEG bytes. Each frame is stored ONCE.
- ``flows-<tag>.array_record``: one record per ordered pair (t, partner), partner in [t - gap, t + gap] minus t, inside
  the video; in video order, then t ascending, then partner ascending. Payload: the flow t -> partner at flow_size in
  normalised units (u * 2 / W, v * 2 / H), float16 (F, F, 2) C-order little-endian.
- ``shard-<tag>.json``: written last, atomically; its presence marks the shard complete. Holds the export parameters,
  the two file names, their byte sizes, record counts and the video table: for each video its global id, name,
  num_frames, frame_offset and pair_offset (first record of the video in this shard's two files).

``manifest.json`` (one worker) or ``manifest-I-of-N.json`` (worker I of N) sums a worker's shards: method, checkpoint
digest, parameters, shard list, totals (num_videos, num_frames, num_pairs, num_skipped, skipped names) and the pairs
whose flow is not finite (exported, but skipped by the pipeline).

Every record is ``b"FFR1" + uint32 little-endian header length + JSON header + payload``; the header names the video
id, t (and partner, method, shape for flows), so each record is self-describing.

Why pairs as their own records: a training sample needs one frame and ONE of its up-to-2*gap flows. With the fixed
ordering above the record index of frame t is ``frame_start[v] + t`` and that of pair (t, partner) is
``pair_start[v] + pair_index(t, partner)``, computed from the video table alone, so grain reads exactly two records
per sample (~JPEG + F*F*4 bytes) and never a frame's other flows.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import struct
from collections.abc import Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from flowfeat_jax import errors

RECORD_MAGIC = b"FFR1"
FORMAT = "flowfeat-flow-records/1"
FLOW_DTYPE = np.dtype("<f2")
# One record per chunk: random access reads a single record; JPEG and float16 flow gain little from compression.
WRITER_OPTIONS = "group_size:1,uncompressed"
_MANIFEST_PART = re.compile(r"manifest-(\d+)-of-(\d+)\.json$")


def encode_record(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return RECORD_MAGIC + struct.pack("<I", len(head)) + head + payload


def decode_record(data: bytes) -> tuple[dict, memoryview]:
    """(header dict, payload view) of one record; ValueError if it is not a flow-export record. (Damaged bytes are
    caught earlier: ArrayRecord / Riegeli hashes every chunk, and a chunk here is one record.)"""
    if len(data) < 8 or data[:4] != RECORD_MAGIC:
        raise ValueError(f"not a flowfeat flow record (starts {bytes(data[:4])!r})")
    (length,) = struct.unpack_from("<I", data, 4)
    return json.loads(bytes(data[8 : 8 + length])), memoryview(data)[8 + length :]


def decode_flow(payload: bytes | memoryview, flow_size: int) -> np.ndarray:
    """float16 payload -> float32 flow (F, F, 2)."""
    return np.frombuffer(payload, FLOW_DTYPE).reshape(flow_size, flow_size, 2).astype(np.float32)


def partners(t: int, num_frames: int, gap: int) -> list[int]:
    """Partners of frame t: t-gap..t+gap without t, inside [0, num_frames)."""
    return [p for p in range(t - gap, t + gap + 1) if p != t and 0 <= p < num_frames]


def pairs_before(t: int, num_frames: int, gap: int) -> int:
    """Number of pair records of frames 0..t-1: each frame s has min(gap, s) earlier and min(gap, T-1-s) later
    partners."""
    s = np.arange(t)
    return int(np.minimum(gap, s).sum() + np.minimum(gap, num_frames - 1 - s).sum())


def pair_index(t: int, partner: int, num_frames: int, gap: int) -> int:
    """Index of pair (t, partner) among a video's pair records."""
    if not 0 < abs(partner - t) <= gap or not 0 <= partner < num_frames:
        raise ValueError(f"({t}, {partner}) is not a pair of a {num_frames}-frame video with gap {gap}")
    return pairs_before(t, num_frames, gap) + partners(t, num_frames, gap).index(partner)


def num_pairs(num_frames: int, gap: int) -> int:
    return pairs_before(num_frames, num_frames, gap)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_tag(shard_index: int, num_shards: int, chunk: int) -> str:
    return f"{shard_index}-of-{num_shards}-{chunk:05d}"


def manifest_name(shard_index: int, num_shards: int) -> str:
    return "manifest.json" if num_shards == 1 else f"manifest-{shard_index}-of-{num_shards}.json"


def write_json_atomic(path: pathlib.Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, path)


def read_json(path: pathlib.Path) -> dict:
    """A manifest or shard json; ValueError naming the file when it is not a JSON object."""
    return errors.read_json_object(path, hint="delete the export and export again")


def check_manifest(path: pathlib.Path, manifest: dict) -> None:
    """The keys readers use are present and the totals equal the sums over the shards (a hand-edited or mixed-up
    manifest would otherwise index the wrong records)."""
    needed = ("params", "shards", "num_videos", "num_frames", "num_pairs", "num_skipped", "nonfinite_pairs")
    missing = [k for k in needed if k not in manifest]
    if missing:
        raise ValueError(f"{path}: manifest lacks {', '.join(missing)}")
    for total, part in (("num_videos", "num_videos"), ("num_frames", "num_frames"), ("num_pairs", "num_pairs")):
        summed = sum(int(shard.get(part, -1)) for shard in manifest["shards"])
        if summed != manifest[total]:
            raise ValueError(f"{path}: {total} is {manifest[total]} but its shards hold {summed}")
    for shard in manifest["shards"]:
        videos = shard.get("videos", [])
        if len(videos) != shard.get("num_videos") or sum(v.get("num_frames", 0) for v in videos) != shard.get(
            "num_frames"
        ):
            raise ValueError(f"{path}: shard {shard.get('tag')} lists {len(videos)} videos with other counts than "
                             f"its num_videos / num_frames")
        pairs = sum(num_pairs(v["num_frames"], int(manifest["params"]["gap"])) for v in videos)
        if pairs != shard.get("num_pairs"):
            raise ValueError(f"{path}: shard {shard.get('tag')} says {shard.get('num_pairs')} pairs, its videos make "
                             f"{pairs} at gap {manifest['params']['gap']}")


def _read_manifest(path: pathlib.Path) -> dict:
    manifest = read_json(path)
    check_manifest(path, manifest)
    return manifest


def load_manifests(export_dir: str | os.PathLike) -> list[dict]:
    """The manifest of ``export_dir``: ``manifest.json``, or all parts ``manifest-I-of-N.json`` (every I present,
    one parameter set). Raises FileNotFoundError / ValueError naming what is missing or inconsistent."""
    root = pathlib.Path(export_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"flow export directory not found: {root}")
    if (root / "manifest.json").is_file():
        return [_read_manifest(root / "manifest.json")]
    parts = {}
    for path in root.iterdir():
        match = _MANIFEST_PART.match(path.name)
        if match:
            parts.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not parts:
        raise FileNotFoundError(f"no manifest.json or manifest-I-of-N.json in {root}: export not finished?")
    if len(parts) > 1:
        raise ValueError(f"{root} mixes manifests of different worker counts {sorted(parts)}")
    ((count, found),) = parts.items()
    missing = [manifest_name(i, count) for i in range(count) if i not in found]
    if missing:
        raise FileNotFoundError(f"{root} lacks manifest parts {missing} (workers not finished?)")
    manifests = [_read_manifest(found[i]) for i in range(count)]
    for i, manifest in enumerate(manifests[1:], 1):
        if manifest["params"] != manifests[0]["params"]:
            raise ValueError(f"{found[i]} was exported with other parameters than {found[0]}")
    return manifests


@dataclasses.dataclass(frozen=True)
class FlowRecords:
    """An opened export: shard files in global order and the per-video index tables (V videos).

    frame_start[v] / pair_start[v] index into the concatenation of all frame files / flow files (in the order of
    ``frame_files`` / ``flow_files``), as grain's ArrayRecordDataSource concatenates them.
    """

    root: pathlib.Path
    params: dict
    frame_files: tuple[str, ...]
    flow_files: tuple[str, ...]
    frames_per_file: tuple[int, ...]
    pairs_per_file: tuple[int, ...]
    video_ids: np.ndarray  # (V,) int32 global video id (position in the exporter's sorted video list)
    names: tuple[str, ...]
    num_frames: np.ndarray  # (V,) int32
    frame_start: np.ndarray  # (V,) int64
    pair_start: np.ndarray  # (V,) int64
    num_skipped: int
    nonfinite_pairs: tuple[tuple[int, int, int], ...]  # (video id, t, partner)

    @property
    def gap(self) -> int:
        return int(self.params["gap"])

    @property
    def frame_size(self) -> int:
        return int(self.params["frame_size"])

    @property
    def flow_size(self) -> int:
        return int(self.params["flow_size"])

    @property
    def num_videos(self) -> int:
        return len(self.names)


def _check_shard_file(root: pathlib.Path, name: str, size: int, count: int) -> str:
    """The path of a shard file that exists, has the manifest's size, opens as ArrayRecord (its footer and index read,
    not its records) and holds the manifest's record count; else one error naming it."""
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"shard file {path} listed in the manifest is missing")
    actual = path.stat().st_size
    if actual != size:
        raise ValueError(f"shard file {path} is {actual} bytes, the manifest says {size}: truncated or overwritten")
    try:
        reader = ArrayRecordReader(str(path))
        try:
            found = reader.num_records()
        finally:
            reader.close()
    except (RuntimeError, OSError, ValueError) as e:  # riegeli reports damaged bytes as RuntimeError
        raise ValueError(f"shard file {path} is damaged ({' '.join(str(e).split())[:200]}); export it again") from None
    if found != count:
        raise ValueError(f"shard file {path} holds {found} records, the manifest says {count}")
    return str(path)


def open_flow_records(export_dir: str | os.PathLike) -> FlowRecords:
    """Opens an export directory (one manifest or all worker parts) and checks every shard file is complete."""
    root = pathlib.Path(export_dir)
    manifests = load_manifests(root)
    frame_files, flow_files, frames_per_file, pairs_per_file = [], [], [], []
    ids, names, lengths, frame_start, pair_start, nonfinite = [], [], [], [], [], []
    frames_so_far = pairs_so_far = 0
    for manifest in manifests:
        for shard in manifest["shards"]:
            frames, flows = shard["frames_file"], shard["flows_file"]
            frame_files.append(_check_shard_file(root, frames, shard["frames_bytes"], shard["num_frames"]))
            flow_files.append(_check_shard_file(root, flows, shard["flows_bytes"], shard["num_pairs"]))
            for video in shard["videos"]:
                ids.append(video["video"])
                names.append(video["name"])
                lengths.append(video["num_frames"])
                frame_start.append(frames_so_far + video["frame_offset"])
                pair_start.append(pairs_so_far + video["pair_offset"])
            frames_per_file.append(shard["num_frames"])
            pairs_per_file.append(shard["num_pairs"])
            frames_so_far += shard["num_frames"]
            pairs_so_far += shard["num_pairs"]
        nonfinite.extend(tuple(p) for p in manifest["nonfinite_pairs"])
    if not names:
        raise ValueError(f"flow export {root} holds no videos")
    return FlowRecords(
        root=root,
        params=manifests[0]["params"],
        frame_files=tuple(frame_files),
        flow_files=tuple(flow_files),
        frames_per_file=tuple(frames_per_file),
        pairs_per_file=tuple(pairs_per_file),
        video_ids=np.asarray(ids, np.int32),
        names=tuple(names),
        num_frames=np.asarray(lengths, np.int32),
        frame_start=np.asarray(frame_start, np.int64),
        pair_start=np.asarray(pair_start, np.int64),
        num_skipped=sum(m["num_skipped"] for m in manifests),
        nonfinite_pairs=tuple(nonfinite),
    )


def read_all_pairs(records: FlowRecords, videos: Sequence[int] | None = None) -> dict[tuple[int, int, int], np.ndarray]:
    """All flows of an export as {(video id, t, partner): float32 (F, F, 2)}; for tests and inspection."""
    flows = {}
    for path in records.flow_files:
        reader = ArrayRecordReader(path)
        try:
            count = reader.num_records()
            for data in (data for begin in range(0, count, 64) for data in reader.read(begin, min(begin + 64, count))):
                header, payload = decode_record(data)
                if videos is None or header["video"] in videos:
                    flows[(header["video"], header["t"], header["partner"])] = decode_flow(payload, records.flow_size)
        finally:
            reader.close()
    return flows
