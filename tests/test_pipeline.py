"""Grain pipeline over a DIS export of two 12-frame DAVIS clips: batches, sampling, state, sharding, bad records."""

import io
import itertools
import json
import pathlib
import shutil

import numpy as np
import pytest
from conftest import CLIP_FRAMES as NUM_FRAMES
from PIL import Image

from flowfeat_jax.data import export, pipeline, records
from flowfeat_jax.flow import dis

CFG = export.ExportConfig(method="dis", frame_size=128, flow_size=64, videos_per_shard=1, batch_size=1)


@pytest.fixture(scope="module")
def exported(davis_clips, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("export")
    export.export_flows(davis_clips, out, CFG, progress=False)
    return out


def _samples(batches) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in s) for b in batches for s in zip(b["video"], b["t"], b["partner"], strict=True)]


def _dataset(root, **kwargs):
    defaults = {"batch_size": 4, "seed": 0, "worker_count": 0, "shard_index": 0, "shard_count": 1}
    return pipeline.make_pair_dataset(root, **{**defaults, **kwargs})


def test_batches_hold_the_exported_frames_and_flows(exported):
    opened = records.open_flow_records(exported)
    flows = records.read_all_pairs(opened)
    from array_record.python.array_record_module import ArrayRecordReader

    jpegs = {}
    for path in opened.frame_files:
        reader = ArrayRecordReader(path)
        for data in reader.read(0, reader.num_records()):
            header, payload = records.decode_record(data)
            jpegs[(header["video"], header["t"])] = bytes(payload)
        reader.close()

    batches = list(itertools.islice(iter(_dataset(exported)), 3))
    for batch in batches:
        assert batch["frame"].shape == (4, 128, 128, 3) and batch["frame"].dtype == np.uint8
        assert batch["flow"].shape == (4, 64, 64, 2) and batch["flow"].dtype == np.float32
        assert all(batch[k].shape == (4,) and batch[k].dtype == np.int32 for k in ("video", "t", "partner"))
        assert np.isfinite(batch["flow"]).all() and 0 < np.abs(batch["flow"]).max() < 2
        assert batch["frame"].max() > 100  # real image content, not zeros
    for i, (video, t, partner) in enumerate(_samples(batches)):
        batch, row = batches[i // 4], i % 4
        assert video in (0, 1) and 2 <= t <= NUM_FRAMES - 3 and abs(partner - t) in (1, 2)
        np.testing.assert_array_equal(batch["flow"][row], flows[(video, t, partner)])
        np.testing.assert_array_equal(batch["frame"][row], np.asarray(Image.open(io.BytesIO(jpegs[(video, t)]))))


def test_epoch_size_sampling_and_seed(exported):
    assert pipeline.epoch_size(num_videos=3, batch_size=4) == 40 and pipeline.epoch_size(500, 4) == 500
    one_epoch = list(_dataset(exported, num_epochs=1))
    assert len(one_epoch) == 10  # max(2 videos, 10 * 4) samples
    samples = _samples(one_epoch)
    assert sum(v == 0 for v, _, _ in samples) == 20  # every video equally often, as index % #videos
    directions = {np.sign(p - t) * min(abs(p - t), 2) for _, t, p in samples}
    assert directions == {-2, -1, 1, 2}
    assert _samples(_dataset(exported, num_epochs=1)) == samples  # deterministic
    assert _samples(_dataset(exported, num_epochs=1, seed=1)) != samples
    second_epoch = _samples(itertools.islice(iter(_dataset(exported)), 10, 20))
    assert second_epoch != samples  # reshuffled and redrawn per epoch


def test_timeflip_false_draws_forward_partners_only(exported):
    """Kinetics (data.timeflip=False): partner = t0 + k, k in 1..gap, t0 from frame 0 on; never t0 - k."""
    samples = _samples(_dataset(exported, num_epochs=3, timeflip=False))
    assert len(samples) == 3 * 40
    assert {p - t for _, t, p in samples} == {1, 2}
    assert min(t for _, t, _ in samples) < CFG.gap  # frames 0..gap-1 are reachable as t0 (they are not with timeflip)
    assert max(t for _, t, _ in samples) <= NUM_FRAMES - 1 - CFG.gap
    with_flip = _samples(_dataset(exported, num_epochs=3))
    assert min(t for _, t, _ in with_flip) >= CFG.gap and {np.sign(p - t) for _, t, p in with_flip} == {-1, 1}


@pytest.mark.slow
def test_iterator_state_resumes_the_same_sequence_with_workers(exported):
    dataset = _dataset(exported, worker_count=2, seed=3)
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = [next(iterator) for _ in range(3)]
    resumed = iter(dataset)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
    assert _samples(got) == _samples(expected)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(got, expected, strict=True) for k in a)
    in_process = _samples(itertools.islice(iter(_dataset(exported, worker_count=0, seed=3)), 6))
    assert in_process[12:] == _samples(expected)  # workers build whole batches: same sequence as in-process


def test_process_shards_split_the_global_sequence(exported):
    whole = _samples(itertools.islice(iter(_dataset(exported, batch_size=4)), 5))
    shards = [_dataset(exported, batch_size=2, shard_index=i, shard_count=2) for i in (0, 1)]
    shards = [_samples(itertools.islice(iter(shard), 5)) for shard in shards]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


def test_nonfinite_flows_are_skipped_and_counted(davis_clips, exported, tmp_path):
    pair_order = [(v, t, p) for v in (0, 1) for t, p in export._video_pairs(NUM_FRAMES, CFG.gap)]
    calls = iter(pair_order)
    real = dis.DisFlow()

    def nan_on_even_t(img1, img2):  # batch_size 1: one call per pair, in record order
        flow = real(img1, img2)
        if next(calls)[1] % 2 == 0:
            flow[0, 0, 0, 1] = np.inf
        return flow

    manifest = export.export_flows(davis_clips, tmp_path, CFG, flow_fn=nan_on_even_t, progress=False)
    assert manifest["num_nonfinite_pairs"] == sum(t % 2 == 0 for _, t, _ in pair_order)
    clean = _samples(_dataset(exported, num_epochs=1))
    redrawn = _samples(_dataset(tmp_path, num_epochs=1))
    assert len(redrawn) == len(clean) == 40 and all(t % 2 == 1 for _, t, _ in redrawn)  # full batches, no NaN/Inf
    changed = [i for i, (a, b) in enumerate(zip(clean, redrawn, strict=True)) if a != b]
    assert changed == [i for i, (_, t, _) in enumerate(clean) if t % 2 == 0]  # only non-finite draws were redrawn
    assert [redrawn[i][0] for i in changed] == [clean[i][0] for i in changed]  # within the same video


def test_truncated_or_corrupt_shard_is_named(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    flows_file = broken / "flows-0-of-1-00001.array_record"
    data = flows_file.read_bytes()
    flows_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"flows-0-of-1-00001.array_record is \d+ bytes, the manifest says"):
        records.open_flow_records(broken)

    corrupt = bytearray(data)  # same size, the payload of pair (t 5, partner 6) of video 1 damaged
    payload_at = data.index(b'"video":1,"t":5,"partner":6,') + 200
    corrupt[payload_at : payload_at + 64] = bytes(64)
    flows_file.write_bytes(bytes(corrupt))
    sampler = pipeline.FlowPairSampler(records.open_flow_records(broken))
    assert sampler.read(1, 5, 4)["t"] == 5  # other records still read
    with pytest.raises(ValueError, match=r"record \d+ \(in shard .*flows-0-of-1-00001.array_record\): Corrupted"):
        sampler.read(1, 5, 6)
    (broken / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        records.open_flow_records(broken)
