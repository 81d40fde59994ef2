"""Grain pipeline over exported flow records: random (frame, flow) pairs -> training batches.

Sampling mirrors the reference dataloader.py ``DataVideo`` (recipe.md steps 1 and 10) rather than drawing uniformly
over all pairs: an epoch has ``max(#videos, 10 * batch_size)`` samples; sample i of an epoch (after a per-epoch
shuffle) takes video ``i mod #videos``, then t0 uniformly in [gap, T - 1 - gap] (room for the window in both time
directions; temp_win 2, timeflip on), k uniformly in {1..gap} and a random direction: partner = t0 +- k. With
``timeflip=False`` (reference kinetics.yaml) t0 is uniform in [0, T - 1 - gap] and partner = t0 + k only. Long and
short videos are thus seen equally often, as in the reference.

Each sample is read as two records (the JPEG square frame t0 and the flow t0 -> partner; see records.py), decoded
and batched into the dict of interfaces.md:
  frame uint8 (B, S, S, 3), flow float32 (B, F, F, 2) in normalised units (not standardised),
  video int32 (B,) (global video id), t int32 (B,), partner int32 (B,).
A pair whose flow holds NaN/Inf is skipped: the sample redraws (t0, partner) in the same video from its own random
stream, so batches stay full and the sequence stays deterministic. The export manifest counts and lists such pairs
(``num_nonfinite_pairs``, ``FlowRecords.nonfinite_pairs``).

The dataset is a grain MapDataset up to and including batching: samples are drawn before the per-process slice
``[jax.process_index()::jax.process_count()]`` (a sample does not depend on the number of processes) and batches are
whole elements, so worker processes change neither the batches nor their order. Iterator state (``get_state`` /
``set_state``, or ``grain.checkpoint.CheckpointSave``) resumes the exact sequence.
"""

import os

import cv2
import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from flowfeat_jax.data import records as records_lib

MIN_SAMPLES_PER_EPOCH_IN_BATCHES = 10  # reference DataVideo(min_num_iter=10)


def epoch_size(num_videos: int, batch_size: int) -> int:
    """Samples per epoch: max(#videos, 10 * batch) (recipe.md step 10)."""
    return max(num_videos, MIN_SAMPLES_PER_EPOCH_IN_BATCHES * batch_size)


class FlowPairSampler(grain.transforms.RandomMap):
    """Epoch index -> one sample dict, drawn as the reference dataloader does (module docstring).

    The ArrayRecord sources are opened lazily, once per worker process.
    """

    def __init__(self, records: records_lib.FlowRecords, max_draws: int = 100, timeflip: bool = True):
        if int(records.num_frames.min()) < 2 * records.gap + 1:
            raise ValueError(f"videos need >= {2 * records.gap + 1} frames for gap {records.gap}")
        self.records = records
        self.timeflip = timeflip
        self.max_draws = max_draws
        self._sources = None  # (frames, flows) ArrayRecordDataSources
        self._frame_ends = np.cumsum(records.frames_per_file)
        self._flow_ends = np.cumsum(records.pairs_per_file)

    def __getstate__(self):  # the sources hold open files: reopen them in each worker process
        return {**self.__dict__, "_sources": None}

    def random_map(self, index: int, rng: np.random.Generator) -> dict:
        video, gap = int(index) % self.records.num_videos, self.records.gap
        length = int(self.records.num_frames[video])
        for _ in range(self.max_draws):
            if self.timeflip:
                t0 = int(rng.integers(gap, length - gap))  # [gap, T - 1 - gap]
                partner = t0 + int(rng.integers(1, gap + 1)) * int(rng.choice((-1, 1)))
            else:  # dataloader.py: frame_idx0 in [0, T - 1 - gap], frame_idx1 = frame_idx0 + k
                t0 = int(rng.integers(0, length - gap))
                partner = t0 + int(rng.integers(1, gap + 1))
            sample = self.read(video, t0, partner)
            if sample is not None:
                return sample
        raise ValueError(f"{self.max_draws} draws of video {self.records.names[video]} all hit non-finite flows")

    def _record(self, source, files, ends, index: int) -> tuple[dict, memoryview]:
        path = files[int(np.searchsorted(ends, index, side="right"))]
        try:
            return records_lib.decode_record(source[index])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"cannot read record {index} (in shard {path}): {e}") from e

    def read(self, video: int, t0: int, partner: int) -> dict | None:
        """The sample of pair (t0, partner) of the video at table position ``video``; None if its flow is not finite."""
        if self._sources is None:  # one assignment: grain calls this from several reader threads
            self._sources = (
                grain.sources.ArrayRecordDataSource(list(self.records.frame_files)),
                grain.sources.ArrayRecordDataSource(list(self.records.flow_files)),
            )
        frames, flows = self._sources
        rec = self.records
        length, video_id = int(rec.num_frames[video]), int(rec.video_ids[video])
        frame_index = int(rec.frame_start[video]) + t0
        pair_index = int(rec.pair_start[video]) + records_lib.pair_index(t0, partner, length, rec.gap)
        frame_header, jpeg = self._record(frames, rec.frame_files, self._frame_ends, frame_index)
        flow_header, flow_bytes = self._record(flows, rec.flow_files, self._flow_ends, pair_index)
        frame_key = (frame_header["video"], frame_header["t"])
        flow_key = (flow_header["video"], flow_header["t"], flow_header["partner"])
        if frame_key != (video_id, t0) or flow_key != (video_id, t0, partner):
            raise ValueError(f"records of {rec.root} do not match its manifest at video {video_id} t {t0}: re-export")
        flow = records_lib.decode_flow(flow_bytes, rec.flow_size)
        if not np.isfinite(flow).all():
            return None
        return {
            "frame": decode_jpeg(jpeg),
            "flow": flow,
            "video": np.int32(video_id),
            "t": np.int32(t0),
            "partner": np.int32(partner),
        }


def decode_jpeg(jpeg: bytes | memoryview) -> np.ndarray:
    """(S, S, 3) uint8 RGB of a stored frame. OpenCV's decoder, straight to RGB: the same pixels as PIL's
    (libjpeg-turbo both; 60 DAVIS frames at 448², quality 95, identical) in 0.92 vs 3.6 ms per frame (2 busy CPUs);
    decoding is most of a sample's time (tools/bench_pipeline.py)."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise ValueError("cannot decode a stored JPEG frame")
    return image


def make_pair_dataset(
    records: records_lib.FlowRecords | str | os.PathLike,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    worker_count: int = 2,
    read_threads: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
    timeflip: bool = True,
) -> grain.IterDataset:
    """Batches of random (frame, flow) pairs from an export directory (see the module docstring).

    With ``worker_count > 0`` grain spawns processes: a script must build and iterate under
    ``if __name__ == "__main__":``.

    Args:
      records: an opened export or its directory.
      batch_size: samples per batch (per process); an incomplete last batch is dropped.
      seed: decides the shuffle and every drawn pair.
      num_epochs: epochs of ``epoch_size`` samples; None repeats forever (training).
      worker_count: grain worker processes, each building whole batches (0 = in this process).
      read_threads: batches built concurrently per process (each buffers one batch: ~1 MB per sample at 448/224).
      shard_index, shard_count: this process's share; default jax.process_index() / jax.process_count().
      timeflip: partners in both time directions (released YouTube-VOS); False: t0 + k only (Kinetics).
    """
    if not isinstance(records, records_lib.FlowRecords):
        records = records_lib.open_flow_records(records)
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    size = epoch_size(records.num_videos, batch_size * shard_count)
    ds = grain.MapDataset.range(size).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.random_map(FlowPairSampler(records, timeflip=timeflip), seed=seed)
    ds = ds[shard_index::shard_count].batch(batch_size, drop_remainder=True)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads))
    if worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app (scripts, pytest) use their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter_ds
