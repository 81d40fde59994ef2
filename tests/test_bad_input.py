"""Bad input across the CLIs (issue 8 item 4), one row per case.

Every row: the tool exits non-zero where the run cannot go on, prints ONE line on stderr (`<prog>: error: ...`) that
names the file or key and what is expected, no traceback (`--verbose` shows one), and leaves what an earlier run
wrote byte-for-byte as it was. Tools with a `main(argv)` are called in-process; the absl CLIs (flowfeat_jax.main,
flowfeat_jax.evaluate, tools/score_davis.py) run as subprocesses, since their flag parsing is what is tested.
"""

import contextlib
import errno
import gc
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.nnx as flax_nnx
import jax
import numpy as np
import optax
import pytest
import torch
from etils import epath
from PIL import Image
from conftest import TINY_MODEL, config_flags, tiny_config

from flowfeat_jax import cli
from flowfeat_jax.data import export, pipeline, records, synthetic
from flowfeat_jax.data import videos as videos_lib
from flowfeat_jax.eval import davis as davis_lib
from flowfeat_jax.ports import build
from flowfeat_jax.torch_ref.flowfeat import TorchFlowFeat, TorchFlowFeatConfig
from flowfeat_jax.torch_ref.vit import HubViTConfig
from flowfeat_jax.train import checkpoint as ckpt_lib
from flowfeat_jax.train import loop
from flowfeat_jax.train import run_support
from flowfeat_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "flowfeat_jax" / "assets" / "demo_clip"
CLIP_FRAMES = sorted((DEMO_CLIP / "JPEGImages" / "480p" / "blackswan").glob("*.jpg"))


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def tool_main(name: str):
    spec = importlib.util.spec_from_file_location(f"bad_input_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def file_hashes(root: pathlib.Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_one_line(stderr: str, prog: str, *named: str) -> str:
    """The stderr of a failed run: exactly one line `prog: error: ...` naming each of `named`."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]  # progress bars may stay
    assert len(lines) == 1, stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for name in named:
        assert str(name) in line, (name, line)
    return line


def guarded_train(config, workdir, validate=None) -> tuple[int, str]:
    """loop.train under cli.run_guarded as flowfeat_jax.main runs it: (exit status, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.run_guarded(lambda: loop.train(config, workdir, validate), prog="flowfeat_jax.main",
                                 verbose=False)
    return status, stderr.getvalue()


def make_video(folder: pathlib.Path, num_frames: int) -> pathlib.Path:
    folder.mkdir(parents=True)
    for path in CLIP_FRAMES[:num_frames]:
        shutil.copy(path, folder / path.name)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Shared artefacts: a tiny run (checkpoint 3; the write of checkpoint 6 fails with a full disk) and a flow export
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory):
    """6 tiny steps, checkpoints every 3; writing checkpoint 6 raises ENOSPC inside orbax.

    Returns (workdir, exit status, stderr, hashes of checkpoints/3 taken when the failing write began).
    """
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(num_steps=6)
    before = {}
    write_text = epath.Path.write_text

    def full_disk(self, *args, **kwargs):
        if "/6.orbax-checkpoint-tmp" in str(self):
            before.setdefault("hashes", file_hashes(workdir / "checkpoints" / "3"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(epath.Path, "write_text", full_disk)
        status, stderr = guarded_train(config, workdir)
    return workdir, status, stderr, before.get("hashes")


def copy_run(workdir: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
    """The run without the half-written checkpoint 6 (orbax may still be cleaning it up in the background)."""
    shutil.copytree(workdir, to, ignore=shutil.ignore_patterns("*orbax-checkpoint-tmp*"))
    return to


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> pathlib.Path:
    """A folder of two frame-folder videos: `clip` (16 frames) and `short` (3 frames, below --min-frames 5)."""
    root = tmp_path_factory.mktemp("videos")
    make_video(root / "clip", 16)
    make_video(root / "short", 3)
    return root


EXPORT_ARGS = ["--method", "dis", "--frame-size", "64", "--flow-size", "32", "--min-frames", "5", "--gap", "2"]


@pytest.fixture(scope="module")
def exported(videos, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("flow")
    assert tool_main("export_flow")(["--videos", str(videos), "--out", str(out), *EXPORT_ARGS]) == 0
    return out


# --------------------------------------------------------------------------------------------------------------------
# flowfeat_jax.main (absl flag parsing in a subprocess; the training itself in-process through cli.run_guarded)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, named",
    [
        ("--config.train.batchsize=8", ["--config.train.batchsize=8", "batch_size"]),  # unknown key, a suggestion
        ("--config.train.batch_size=eight", ["--config.train.batch_size=eight", "int"]),  # wrong type
        ("--config.model.encoder_size.hiddensize=3", ["hiddensize", "hidden_size"]),
    ],
)
def test_main_bad_override(tmp_path, override, named):
    result = run_module("-m", "flowfeat_jax.main", "--config", "configs/demo.py", f"--workdir={tmp_path}", override)
    assert result.returncode != 0
    assert_one_line(result.stderr, "flowfeat_jax.main", *named)
    assert not list(tmp_path.iterdir())


def test_main_verbose_shows_the_traceback(tmp_path):
    result = run_module(
        "-m",
        "flowfeat_jax.main",
        "--config",
        "configs/demo.py",
        f"--workdir={tmp_path}",
        "--config.train.batchsize=8",
        "--verbose",
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "batchsize" in result.stderr.splitlines()[-1]


def test_main_missing_config_file(tmp_path):
    result = run_module("-m", "flowfeat_jax.main", "--config", "configs/no_such.py", f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert_one_line(result.stderr, "flowfeat_jax.main", "configs/no_such.py", "No such file")


@pytest.mark.slow
def test_disk_full_on_checkpoint_write_keeps_earlier_checkpoints(disk_full_run):
    workdir, status, stderr, before = disk_full_run
    assert status == 1
    assert_one_line(stderr, "flowfeat_jax.main", "cannot write", str(workdir / "checkpoints"), "No space left")
    assert before and file_hashes(workdir / "checkpoints" / "3") == before
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]


def test_main_refuses_to_resume_onto_another_encoder(disk_full_run, tmp_path):
    workdir = copy_run(disk_full_run[0], tmp_path / "run")
    before = file_hashes(workdir)
    config = tiny_config(num_steps=6)
    config.seed = 1  # another random encoder
    status, stderr = guarded_train(config, workdir)
    assert status == 1
    assert_one_line(stderr, "flowfeat_jax.main", str(workdir), "encoder", "another --workdir")
    assert file_hashes(workdir) == before  # config.json included: a refused run rewrites nothing


def test_workdir_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    status, stderr = guarded_train(tiny_config(), tmp_path / "afile" / "sub")
    assert status == 1
    assert_one_line(stderr, "flowfeat_jax.main", str(tmp_path / "afile" / "sub"), "writable")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_input_size_off_the_patch_grid(tmp_path):
    config = tiny_config()
    config.train.input_size = 70  # patch 14: the decoder needs multiples of 28
    status, stderr = guarded_train(config, tmp_path)
    assert status == 1
    assert_one_line(stderr, "flowfeat_jax.main", "train.input_size", "70x70", "56 or 84")


def test_truncated_record_shard_is_named(exported, tmp_path):
    damaged = tmp_path / "flow"
    shutil.copytree(exported, damaged)
    shard = min(damaged.glob("flows-*.array_record"))
    shard.write_bytes(shard.read_bytes()[:-100])
    before = file_hashes(damaged)
    config = tiny_config()
    config.data.source, config.data.records = "records", str(damaged)
    config.data.frame_size, config.data.flow_size = 64, 32
    status, stderr = guarded_train(config, tmp_path / "run")
    assert status == 1
    assert_one_line(stderr, "flowfeat_jax.main", str(shard), "truncated")
    assert file_hashes(damaged) == before


# --------------------------------------------------------------------------------------------------------------------
# tools/export_flow.py and the pipeline
# --------------------------------------------------------------------------------------------------------------------


def test_export_skips_and_counts_short_videos(exported, capsys):
    manifest = records.load_manifests(exported)[0]
    assert manifest["num_videos"] == 1 and manifest["skipped"] == ["short"]
    # A rerun of the same command keeps every file (resume) and says what it skipped.
    before = file_hashes(exported)
    videos_root = pathlib.Path(manifest["videos"])
    assert tool_main("export_flow")(["--videos", str(videos_root), "--out", str(exported), *EXPORT_ARGS]) == 0
    assert "skipped 1 short videos" in capsys.readouterr().out
    assert file_hashes(exported) == before


def test_export_corrupt_frame_names_it_and_keeps_finished_shards(tmp_path, capsys):
    make_video(tmp_path / "videos" / "a_good", 6)
    bad = make_video(tmp_path / "videos" / "b_bad", 6)
    (bad / CLIP_FRAMES[3].name).write_bytes(b"\xff\xd8 not a jpeg")
    argv = [
        "--videos",
        str(tmp_path / "videos"),
        "--out",
        str(tmp_path / "flow"),
        "--videos-per-shard",
        "1",
        *EXPORT_ARGS,
    ]
    assert tool_main("export_flow")(argv) == 1
    assert_one_line(capsys.readouterr().err, "export_flow", str(bad / CLIP_FRAMES[3].name), "cannot decode image")
    shard = json.loads((tmp_path / "flow" / "shard-0-of-1-00000.json").read_text())  # a_good, finished before b_bad
    assert [v["name"] for v in shard["videos"]] == ["a_good"]
    for name in ("frames", "flows"):
        assert (tmp_path / "flow" / shard[f"{name}_file"]).stat().st_size == shard[f"{name}_bytes"]


@pytest.mark.parametrize(
    "args, named",
    [
        (["--videos", "{tmp}/no_such_videos"], ["no_such_videos", "not found"]),
        (["--videos", "{videos}", "--min-frames", "3", "--gap", "2"], ["min_frames", "2 * gap + 1"]),
    ],
)
def test_export_bad_arguments(videos, tmp_path, capsys, args, named):
    args = [a.format(tmp=tmp_path, videos=videos) for a in args]
    argv = [*EXPORT_ARGS, *args, "--out", str(tmp_path / "flow")]
    assert tool_main("export_flow")(argv) == 1
    assert_one_line(capsys.readouterr().err, "export_flow", *named)


def test_export_out_under_a_regular_file(videos, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    argv = ["--videos", str(videos), "--out", str(tmp_path / "afile" / "flow"), *EXPORT_ARGS]
    assert tool_main("export_flow")(argv) == 1
    assert_one_line(capsys.readouterr().err, "export_flow", "cannot create output directory", str(tmp_path / "afile"))


def test_export_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_videos"):
        tool_main("export_flow")(["--videos", str(tmp_path / "no_such_videos"), "--out", str(tmp_path), "--verbose"])


def test_nan_flows_are_counted_at_export_and_skipped_by_the_pipeline(tmp_path):
    make_video(tmp_path / "videos" / "clip", 5)

    def flow_with_nan_at_t2(first, second):  # zero flow; every pair of frame 2 is NaN
        del second
        flows = np.zeros((*first.shape[:3], 2), np.float32)
        flows[[i for i, f in enumerate(first) if np.array_equal(f, frames_small[2])]] = np.nan
        return flows

    frames = [export.square_frame(np.asarray(Image.open(p).convert("RGB")), 64) for p in CLIP_FRAMES[:5]]
    frames_small = [np.asarray(f.resize((32, 32), Image.BILINEAR)) for f in frames]
    cfg = export.ExportConfig(method="dis", gap=1, frame_size=64, flow_size=32, min_frames=3)
    manifest = export.export_flows(
        tmp_path / "videos", tmp_path / "flow", cfg, flow_fn=flow_with_nan_at_t2, progress=False
    )
    assert manifest["num_nonfinite_pairs"] == 2
    assert sorted(map(tuple, manifest["nonfinite_pairs"])) == [(0, 2, 1), (0, 2, 3)]
    dataset = pipeline.make_pair_dataset(tmp_path / "flow", batch_size=4, seed=0, num_epochs=1, worker_count=0)
    batches = list(dataset)
    assert batches and all(np.isfinite(b["flow"]).all() for b in batches)
    assert 2 not in np.concatenate([b["t"] for b in batches])  # t0 = 2 is drawn (t0 in 1..3) but always redrawn


# --------------------------------------------------------------------------------------------------------------------
# flowfeat_jax.evaluate and tools/score_davis.py
# --------------------------------------------------------------------------------------------------------------------


def test_evaluate_names_a_missing_run(tmp_path):
    result = run_module("-m", "flowfeat_jax.evaluate", f"--workdir={tmp_path / 'no_run'}", f"--davis={DEMO_CLIP}")
    assert result.returncode != 0
    assert_one_line(result.stderr, "flowfeat_jax.evaluate", str(tmp_path / "no_run"))


def test_evaluate_unknown_flag():
    result = run_module("-m", "flowfeat_jax.evaluate", "--protocol=knn")
    assert result.returncode != 0
    assert_one_line(result.stderr, "flowfeat_jax.evaluate", "protocol")


@pytest.fixture()
def davis_results(tmp_path) -> pathlib.Path:
    """Result PNGs of the demo clip: its annotations as 0/1 index maps."""
    out = tmp_path / "results" / "blackswan"
    out.mkdir(parents=True)
    for path in sorted((DEMO_CLIP / "Annotations" / "480p" / "blackswan").glob("*.png")):
        labels = (np.asarray(Image.open(path).convert("L")) > 127).astype(np.uint8)
        Image.fromarray(labels, "L").save(out / path.name)
    return out.parent


def score_davis(results: pathlib.Path, out: pathlib.Path) -> subprocess.CompletedProcess:
    return run_module(
        "tools/score_davis.py", f"--davis={DEMO_CLIP}", f"--results={results}", f"--out={out}", "--split=demo"
    )


def test_score_davis_result_png_of_the_wrong_size(davis_results, tmp_path):
    out = tmp_path / "SCORES.json"
    out.write_text("earlier scores")
    frame = sorted((davis_results / "blackswan").glob("*.png"))[4]
    with Image.open(frame) as image:
        image.resize((image.width // 2, image.height // 2), Image.NEAREST).save(frame)
    result = score_davis(davis_results, out)
    assert result.returncode != 0
    assert_one_line(result.stderr, "score_davis", str(frame), "differs")
    assert out.read_text() == "earlier scores"


def test_score_davis_missing_result_frame(davis_results, tmp_path):
    frame = sorted((davis_results / "blackswan").glob("*.png"))[2]
    frame.unlink()
    result = score_davis(davis_results, tmp_path / "SCORES.json")
    assert result.returncode != 0
    assert_one_line(result.stderr, "score_davis", str(frame), "missing")
    assert not (tmp_path / "SCORES.json").exists()


# --------------------------------------------------------------------------------------------------------------------
# tools/extract_features.py, tools/inspect_checkpoint.py, tools/export_torch.py (on the tiny run)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def frame_png(tmp_path) -> pathlib.Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)).save(tmp_path / "frame.png")
    return tmp_path / "frame.png"


@pytest.mark.parametrize(
    "case, named",
    [
        ("missing image", ["no_such.jpg"]),
        ("corrupt image", ["corrupt.jpg", "cannot decode image"]),
        ("size off the grid", ["42x56", "multiples of 28"]),
        ("output under a file", ["afile", "does not exist"]),
    ],
)
def test_extract_features_bad_input(disk_full_run, frame_png, tmp_path, capsys, case, named):
    image, size, out = frame_png, [], tmp_path / "feats.npz"
    if case == "missing image":
        image = tmp_path / "no_such.jpg"
    elif case == "corrupt image":
        image = tmp_path / "corrupt.jpg"
        image.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    elif case == "size off the grid":
        size = ["--size", "42", "56"]
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "feats.npz"
    argv = ["--checkpoint", str(disk_full_run[0]), "--image", str(image), "--out", str(out), *size]
    assert tool_main("extract_features")(argv) == 1
    assert_one_line(capsys.readouterr().err, "extract_features", *named)
    assert not (tmp_path / "feats.npz").exists()


def test_inspect_checkpoint_missing_and_corrupt(disk_full_run, tmp_path, capsys):
    main = tool_main("inspect_checkpoint")
    assert main([str(tmp_path / "no_run")]) == 1
    assert_one_line(capsys.readouterr().err, "inspect_checkpoint", str(tmp_path / "no_run"), "no such")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1
    assert_one_line(capsys.readouterr().err, "inspect_checkpoint", str(empty), "checkpoints/<step>/state")
    broken = tmp_path / "broken"
    shutil.copytree(disk_full_run[0] / "checkpoints", broken / "checkpoints")
    (broken / "checkpoints" / "3" / "meta" / "metadata").write_text("{not json")
    assert main([str(broken)]) == 1
    assert_one_line(capsys.readouterr().err, "inspect_checkpoint", str(broken / "checkpoints" / "3"), "Expecting")


# Orbax leaves the reads of the other arrays as never-awaited coroutines; collected here, not in a later test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_inspect_checkpoint_truncated_array_file(disk_full_run, tmp_path, capsys):
    truncated = copy_run(disk_full_run[0], tmp_path / "truncated")
    array_file = max((truncated / "checkpoints" / "3" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    array_file.write_bytes(array_file.read_bytes()[:50])
    assert tool_main("inspect_checkpoint")([str(truncated)]) == 1
    assert_one_line(capsys.readouterr().err, "inspect_checkpoint", str(truncated / "checkpoints" / "3"), "OCDBT")
    gc.collect()


def test_inspect_checkpoint_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_run"):
        tool_main("inspect_checkpoint")([str(tmp_path / "no_run"), "--verbose"])


def test_export_torch_bad_input(disk_full_run, tmp_path, capsys):
    main = tool_main("export_torch")
    assert main(["--checkpoint", str(tmp_path / "no_run"), "--out", str(tmp_path / "x.pth")]) == 1
    assert_one_line(capsys.readouterr().err, "export_torch", str(tmp_path / "no_run"))
    (tmp_path / "afile").write_text("x")
    assert main(["--checkpoint", str(disk_full_run[0]), "--out", str(tmp_path / "afile" / "x.pth")]) == 1
    assert_one_line(capsys.readouterr().err, "export_torch", "afile", "does not exist")


# --------------------------------------------------------------------------------------------------------------------
# tools/import_torch.py
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def released_state() -> dict[str, torch.Tensor]:
    """A reference-layout state dict of a tiny DINO FlowFeat (width 64, one head, 4 blocks, d = 16)."""
    encoder = HubViTConfig(patch_size=16, hidden_size=64, num_layers=4, num_heads=1, mlp_dim=96, pos_grid=14)
    torch.manual_seed(0)
    return dict(TorchFlowFeat(TorchFlowFeatConfig(encoder, (64,) * 4, 16, (0, 1, 2, 3))).state_dict())


@pytest.mark.parametrize(
    "change, key",
    [
        ("missing", "decoder.scratch.refinenet2.resConfUnit1.conv1.bias"),
        ("extra", "decoder.head.extra"),
        ("shape", "encoder.blocks.1.attn.proj.weight"),
        ("corrupt", None),
    ],
)
def test_import_torch_bad_file(released_state, tmp_path, capsys, change, key):
    state = dict(released_state)
    pth = tmp_path / "bad.pth"
    if change == "missing":
        del state[key]
    elif change == "extra":
        state[key] = torch.zeros(3)
    elif change == "shape":
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    if change == "corrupt":
        pth.write_bytes(b"PK\x03\x04 not a torch file")
    else:
        torch.save(state, pth)
    argv = ["--pth", str(pth), "--out", str(tmp_path / "run"), "--num-heads", "1"]  # width 64: not a released width
    assert tool_main("import_torch")(argv) == 1
    assert_one_line(capsys.readouterr().err, "import_torch", key or str(pth))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]  # nothing written


# --------------------------------------------------------------------------------------------------------------------
# Issue 21: no silent wrong results. Each class of the issue, one row per case (and siblings), through the one
# mechanism that fixes it: config.validate_config, export.export_mismatches, videos.frame_files / read_rgb, the
# step's update guard + save_checkpoint, the architecture record of exports, the resume rules and RunLock.
# --------------------------------------------------------------------------------------------------------------------


def records_config(records_dir: pathlib.Path, **data):
    """tiny_config on an export of EXPORT_ARGS (64 px frames, 32 px flow, gap 2, DIS), with `data` overrides."""
    config = tiny_config()
    config.data.source, config.data.records = "records", str(records_dir)
    config.data.frame_size, config.data.flow_size, config.data.num_workers = 64, 32, 0
    for key, value in data.items():
        config.data[key] = value
    return config


# Class 1: data settings an existing export contradicts (the run would record settings it did not use).
@pytest.mark.parametrize(
    "key, value, exported_value",
    [
        ("frame_size", 112, 64),
        ("flow_size", 16, 32),
        ("gap", 1, 2),
        ("method", "searaft", "dis"),
        ("jpeg_quality", 80, 95),  # sibling
        ("videos", "{tmp}/other_videos", "videos"),  # sibling: another video folder than the export's
    ],
)
def test_data_settings_that_the_export_contradicts_are_refused(exported, tmp_path, key, value, exported_value):
    before = file_hashes(exported)
    if key == "videos":
        value = value.format(tmp=tmp_path)
        make_video(pathlib.Path(value) / "clip", 16)
    status, stderr = guarded_train(records_config(exported, **{key: value}), tmp_path / "run")
    assert status == 1
    assert_one_line(stderr, "flowfeat_jax.main", str(exported), f"data.{key}", repr(value), str(exported_value))
    assert file_hashes(exported) == before
    assert not (tmp_path / "run" / "config.json").exists()


def test_matching_data_settings_are_accepted(exported, tmp_path):
    config = records_config(exported)
    assert loop.ensure_records(config.data, tmp_path) == exported
    manifest = records.load_manifests(exported)[0]
    cfg = export.ExportConfig(method="dis", gap=2, frame_size=64, flow_size=32)
    assert export.export_mismatches(manifest, cfg, videos_spec=manifest["videos"]) == []


# Classes 2-4: frame folders (order, odd entries, bit depth).
def test_numbered_frames_are_read_in_natural_order(tmp_path):
    folder = tmp_path / "video"
    folder.mkdir()
    for i, path in enumerate(CLIP_FRAMES[:12]):
        shutil.copy(path, folder / f"{i + 1}.jpg")
    (folder / "notes.txt").write_text("not a frame")  # other files are not frames, and not an error
    listed = videos_lib.list_videos(folder, min_frames=5).videos[0]
    assert [p.name for p in listed.frames] == [f"{i}.jpg" for i in range(1, 13)]
    assert [p.name for p in davis_lib._sorted_files(folder, ".jpg")] == [f"{i}.jpg" for i in range(1, 13)]
    first = next(videos_lib.iter_frames(listed))
    np.testing.assert_array_equal(first, np.asarray(Image.open(CLIP_FRAMES[0]).convert("RGB")))


@pytest.mark.parametrize("entry", ["folder", "broken link", "folder named like a frame"])
def test_an_odd_entry_among_frames_is_named(tmp_path, capsys, entry):
    video = make_video(tmp_path / "videos" / "clip", 6)
    odd = {"folder": video / "extra", "broken link": video / "00002b.jpg"}.get(entry, video / "00003a.jpg")
    if entry == "broken link":
        odd.symlink_to(tmp_path / "missing.jpg")
    else:
        odd.mkdir()
    argv = ["--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "flow"), *EXPORT_ARGS]
    assert tool_main("export_flow")(argv) == 1
    assert_one_line(capsys.readouterr().err, "export_flow", str(odd), "among the frames")
    assert not (tmp_path / "flow").exists()
    with pytest.raises(ValueError, match="among the frames"):  # the DAVIS reader uses the same helper
        davis_lib._sorted_files(video, ".jpg")


def test_sixteen_bit_frames_are_scaled_by_their_depth(tmp_path):
    folder = tmp_path / "videos" / "grey16"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames16 = [rng.integers(0, 65536, (40, 48), dtype=np.uint16) for _ in range(5)]
    for t, frame in enumerate(frames16):
        Image.fromarray(frame).save(folder / f"{t:05d}.png")
    assert Image.open(folder / "00000.png").mode == "I;16"
    expected = [np.repeat(((f.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, -1)
                for f in frames16]
    listed = videos_lib.list_videos(folder, min_frames=5).videos[0]
    for got, want in zip(videos_lib.iter_frames(listed), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert 60 < expected[0].mean() < 195  # uniform noise: mid-grey on average, where convert("RGB") gave white


def test_floating_point_frames_are_refused(tmp_path, capsys):
    folder = tmp_path / "videos" / "float"
    folder.mkdir(parents=True)
    for t in range(5):
        Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(folder / f"{t:05d}.tif")
        (folder / f"{t:05d}.tif").rename(folder / f"{t:05d}.png")  # PIL opens by content, not name
    argv = ["--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "flow"), *EXPORT_ARGS]
    assert tool_main("export_flow")(argv) == 1
    assert_one_line(capsys.readouterr().err, "export_flow", str(folder / "00000.png"), "floating-point")


# Class 5: non-finite updates never reach the state, and a non-finite state never a checkpoint.
@pytest.mark.slow
def test_a_nan_update_with_a_finite_gradient_is_discarded():
    config = tiny_config()
    model, _ = build.build_flowfeat(config.model, config.seed)
    graphdef, model_state = flax_nnx.split(model)
    pure = flax_nnx.to_pure_dict(model_state)
    tx = optax.adamw(float("nan"))  # what --config.train.lr=nan built before validate_config refused it
    state = loop.init_train_state(pure["decoder"], tx, 0)
    before = ckpt_lib.tree_digest((state.params, state.ema_params, state.opt_state))
    step = step_lib.make_train_step(graphdef, tx, loop.step_config(config))
    batch = next(synthetic.synthetic_batches(0, 2, 112, 56))
    new_state, metrics = jax.jit(step)(state, batch, pure["encoder"])
    assert np.isfinite(float(metrics["grad_norm"])) and not bool(metrics["finite"])
    assert ckpt_lib.tree_digest((new_state.params, new_state.ema_params, new_state.opt_state)) == before
    assert int(new_state.nonfinite) == 1


def test_a_non_finite_state_is_never_checkpointed(disk_full_run, tmp_path):
    workdir = copy_run(disk_full_run[0], tmp_path / "run")
    before = file_hashes(workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints")
    state, meta = checkpointer.restore_raw(3)
    state = step_lib.TrainState(**state)
    state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    with pytest.raises(loop.TrainingError, match="step 9: the train state holds non-finite values; not saved"):
        loop.save_checkpoint(checkpointer, 9, state, meta, None)
    checkpointer.close()
    assert file_hashes(workdir) == before


# Class 8 (and 9's options): one validation pass before any work, each error naming the key and its range.
@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("loss.ridge_alpha", 0.0, "> 0"),
        ("loss.ridge_alpha", -1.0, "> 0"),
        ("loss.sigma", 0.0, "> 0"),
        ("ema.beta", 1.0, "[0, 1)"),
        ("ema.beta", -0.1, "[0, 1)"),
        ("train.lr", -1e-4, ">= 0"),
        ("train.lr", float("nan"), ">= 0"),
        ("train.lr", float("inf"), ">= 0"),
        ("train.crop_scale", (0.5, 1.5), "0 < low <= high <= 1"),
        ("train.crop_scale", (0.0, 0.5), "0 < low <= high <= 1"),
        ("train.crop_scale", (0.8, 0.5), "0 < low <= high <= 1"),
        ("train.input_size", 0, ">= 2"),
        ("model.features", 0, ">= 1"),
        ("data.frame_size", 42, "train.input_size (56) must be <= data.frame_size (42)"),
        # siblings: every other field with a natural range
        ("train.batch_size", 0, ">= 1"),
        ("train.num_steps", 0, ">= 1"),
        ("train.b1", 1.0, "[0, 1)"),
        ("train.weight_decay", -0.1, ">= 0"),
        ("train.log_every", 0, ">= 1"),
        ("train.checkpoint_every", 0, ">= 1"),
        ("train.max_nonfinite", 0, ">= 1"),
        ("loss.flow", "l3", "'l1', 'l2'"),
        ("loss.flow_map", "naive", "'ridge', 'linear'"),
        ("loss.flow_weight", -1.0, ">= 0"),
        ("ema.update_every", 0, ">= 1"),
        ("ema.power", 0.0, "> 0"),
        ("data.gap", 0, ">= 1"),
        ("data.flow_size", 224, "data.flow_size (224) must be <= data.frame_size (112)"),
        ("data.jpeg_quality", 0, "[1, 100]"),
        ("data.method", "flownet", "'dis', 'searaft', 'raft'"),
        ("model.pos_interp", "bicubic", "'hf', 'hub'"),
        ("eval.protocols", "knn,bogus", "subset of knn, linear"),
        ("eval.max_frames", 1, ">= 2"),
        ("eval.every", -1, ">= 0"),
    ],
)
def test_nonsense_settings_are_refused_before_any_work(tmp_path, key, value, expected):
    config = tiny_config()
    group, field = key.split(".")
    config[group][field] = value
    status, stderr = guarded_train(config, tmp_path / "run")
    assert status == 1
    assert_one_line(stderr, "flowfeat_jax.main", key, expected)
    assert not (tmp_path / "run").exists()


def test_invalid_override_on_the_command_line_names_the_key(tmp_path):
    result = run_module(
        "-m", "flowfeat_jax.main", "--config", "configs/demo.py", f"--workdir={tmp_path}",
        "--config.train.crop_scale=(0.5, 1.5)", "--config.model.features=0",
    )
    assert result.returncode == 1
    assert_one_line(result.stderr, "flowfeat_jax.main", "train.crop_scale", "model.features", "(0.5, 1.5)")
    assert not list(tmp_path.iterdir())


def test_eval_short_side_below_two_patches_is_refused_before_training(tmp_path):
    config = tiny_config()
    config.eval.davis, config.eval.short_side = str(DEMO_CLIP), 13
    status, stderr = guarded_train(config, tmp_path / "run", validate=lambda *args: pytest.fail("validated"))
    assert status == 1
    assert_one_line(stderr, "flowfeat_jax.main", "eval.short_side", ">= 28", "13")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.json").exists()


# Class 9: a final validation that did not complete runs on the next invocation.
@pytest.mark.slow
def test_an_unfinished_final_validation_runs_on_the_next_invocation(tmp_path):
    config = tiny_config(num_steps=3)
    config.eval.davis = str(DEMO_CLIP)
    calls = []

    def failing_validate(model, out_dir, kinds):
        calls.append(out_dir.name)
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))

    def validate(model, out_dir, kinds):
        calls.append(out_dir.name)
        return {"eval/knn/JF_mean": 0.5}

    status, stderr = guarded_train(config, tmp_path, failing_validate)
    assert status == 1 and calls == ["step_3"]
    assert_one_line(stderr, "flowfeat_jax.main", "step_3", "No space left")
    assert loop.train(config, tmp_path, validate)["eval/knn/JF_mean"] == 0.5
    assert calls == ["step_3", "step_3"]
    loop.train(config, tmp_path, validate)  # evaluated: not again
    assert calls == ["step_3", "step_3"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3] and rows[-1]["eval/knn/JF_mean"] == 0.5


# Class 10: resume rules, config history, "resuming from step N".
@pytest.mark.parametrize(
    "key, value", [("train.batch_size", 4), ("train.lr", 3e-4), ("loss.flow", "l2"), ("ema.beta", 0.99),
                   ("train.crop_scale", (0.4, 0.6)), ("data.frame_size", 168)],
)
def test_resume_with_a_changed_trajectory_setting_is_refused(disk_full_run, tmp_path, key, value):
    workdir = copy_run(disk_full_run[0], tmp_path / "run")
    before = file_hashes(workdir)
    config = tiny_config(num_steps=6)
    group, field = key.split(".")
    old = config[group][field]
    config[group][field] = value
    status, stderr = guarded_train(config, workdir)
    assert status == 1
    line = assert_one_line(stderr, "flowfeat_jax.main", "resuming from step 3", key, "allow_changes")
    assert f"{old!r} -> {value!r}".replace("(", "[").replace(")", "]") in line.replace("(", "[").replace(")", "]")
    assert file_hashes(workdir) == before  # config.json included


@pytest.mark.slow
def test_resume_with_allowed_changes_keeps_the_config_history(disk_full_run, tmp_path, capsys):
    workdir = copy_run(disk_full_run[0], tmp_path / "run")
    old_config = (workdir / "config.json").read_text()
    config = tiny_config(num_steps=6)
    config.train.lr, config.train.allow_changes = 3e-4, True
    loop.train(config, workdir)
    assert "resuming from step 3" in capsys.readouterr().out
    assert (workdir / "config.3.json").read_text() == old_config
    assert json.loads((workdir / "config.json").read_text())["train"]["lr"] == 3e-4
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the rows of the failed run's steps 4-6 not repeated


def test_settings_that_do_not_alter_the_trajectory_may_change_on_resume():
    saved = json.loads(tiny_config(num_steps=6).to_json_best_effort())
    config = tiny_config(num_steps=60)
    config.train.log_every, config.train.checkpoint_every, config.data.num_workers = 7, 5, 1
    config.eval.davis, config.eval.every = str(DEMO_CLIP), 10
    assert run_support.changed_settings(saved, config) == []
    config.seed = 3
    assert run_support.changed_settings(saved, config) == ["seed: 0 -> 3"]


def test_a_second_training_on_one_workdir_is_refused(tmp_path):
    tmp_path.joinpath("run").mkdir()
    with loop.RunLock(tmp_path / "run"):
        before = file_hashes(tmp_path / "run")
        status, stderr = guarded_train(tiny_config(), tmp_path / "run")
        assert file_hashes(tmp_path / "run") == before
    assert status == 1
    assert_one_line(stderr, "flowfeat_jax.main", str(tmp_path / "run" / "run.lock"), f"pid {os.getpid()}")


# Classes 6 and 7: exports carry the architecture; the round trip keeps the model.
@pytest.fixture(scope="module")
def exported_run(disk_full_run, tmp_path_factory):
    """The tiny run (width 32, 2 heads: not a released width) exported as .pth (+ .pth.json) and .safetensors."""
    out = tmp_path_factory.mktemp("exports")
    main = tool_main("export_torch")
    assert main(["--checkpoint", str(disk_full_run[0]), "--out", str(out / "run.pth")]) == 0
    assert main(["--checkpoint", str(disk_full_run[0]), "--out", str(out / "run.safetensors"), "--safetensors"]) == 0
    return out


@pytest.mark.parametrize("name", ["run.pth", "run.safetensors"])
@pytest.mark.slow
def test_export_import_round_trip_keeps_heads_and_pos_interp(disk_full_run, exported_run, tmp_path, name):
    from flowfeat_jax.inference import load_flowfeat
    from flowfeat_jax.models import flowfeat as flowfeat_models
    from flowfeat_jax.torch_ref.flowfeat import load_torch_flowfeat

    assert load_torch_flowfeat(exported_run / name).cfg.encoder.num_heads == 2
    assert tool_main("import_torch")(["--pth", str(exported_run / name), "--out", str(tmp_path / "run")]) == 0
    original, _, _ = load_flowfeat(disk_full_run[0])
    imported, config, _ = load_flowfeat(tmp_path / "run")
    assert config.model.pos_interp == original.cfg.encoder.pos_interp == "hf"
    assert imported.cfg.encoder == original.cfg.encoder
    images = jax.random.uniform(jax.random.key(0), (1, 84, 112, 3))  # not the stored grid: resizing is exercised
    for got, want in zip(flowfeat_models.forward(imported, images), flowfeat_models.forward(original, images)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("width, heads", [(128, 4), (96, 3)])
def test_a_file_without_architecture_of_an_unreleased_width_needs_the_head_count(tmp_path, capsys, width, heads):
    encoder = HubViTConfig(patch_size=16, hidden_size=width, num_layers=4, num_heads=heads, mlp_dim=64, pos_grid=4)
    torch.manual_seed(0)
    model = TorchFlowFeat(TorchFlowFeatConfig(encoder, (width,) * 4, 16, (0, 1, 2, 3)))  # DINO widths: the encoder's
    torch.save(model.state_dict(), tmp_path / "x.pth")
    main = tool_main("import_torch")
    assert main(["--pth", str(tmp_path / "x.pth"), "--out", str(tmp_path / "run")]) == 1
    assert_one_line(capsys.readouterr().err, "import_torch", str(tmp_path / "x.pth"), f"width {width}", "--num-heads")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pth"]
    assert main(["--pth", str(tmp_path / "x.pth"), "--out", str(tmp_path / "run"), "--num-heads", str(heads)]) == 0
    assert json.loads((tmp_path / "run" / "encoder" / "config.json").read_text())["num_attention_heads"] == heads


def test_import_refuses_a_head_count_the_file_contradicts(exported_run, tmp_path, capsys):
    argv = ["--pth", str(exported_run / "run.pth"), "--out", str(tmp_path / "run"), "--num-heads", "4"]
    assert tool_main("import_torch")(argv) == 1
    assert_one_line(capsys.readouterr().err, "import_torch", "run.pth", "num_heads 2", "4")
    assert not (tmp_path / "run").exists()


# Unclear failures that are now one line naming the file or key.
@pytest.mark.parametrize("case", ["existing file", "existing folder", "pth with --safetensors", "safetensors name"])
def test_export_torch_refuses_outputs_before_any_work(disk_full_run, tmp_path, capsys, case):
    out = {"existing file": tmp_path / "x.pth", "existing folder": tmp_path / "folder",
           "pth with --safetensors": tmp_path / "y.pth", "safetensors name": tmp_path / "z.safetensors"}[case]
    if case == "existing file":
        out.write_bytes(b"earlier export")
    elif case == "existing folder":
        out.mkdir()
    extra = ["--safetensors"] if case == "pth with --safetensors" else []
    before, listing = file_hashes(tmp_path), sorted(tmp_path.rglob("*"))
    assert tool_main("export_torch")(["--checkpoint", str(disk_full_run[0]), "--out", str(out), *extra]) == 1
    named = {"existing file": "--overwrite", "existing folder": "is a folder"}.get(case, "must end in")
    assert_one_line(capsys.readouterr().err, "export_torch", str(out), named)
    assert file_hashes(tmp_path) == before and sorted(tmp_path.rglob("*")) == listing


def test_export_torch_overwrite_replaces_the_file(disk_full_run, tmp_path):
    (tmp_path / "x.pth").write_bytes(b"earlier export")
    argv = ["--checkpoint", str(disk_full_run[0]), "--out", str(tmp_path / "x.pth"), "--overwrite"]
    assert tool_main("export_torch")(argv) == 0
    assert (tmp_path / "x.pth").read_bytes() != b"earlier export" and (tmp_path / "x.pth.json").is_file()


def test_import_torch_pickled_module(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    assert tool_main("import_torch")(["--pth", str(tmp_path / "module.pth"), "--out", str(tmp_path / "run")]) == 1
    line = assert_one_line(capsys.readouterr().err, "import_torch", str(tmp_path / "module.pth"), "state_dict()")
    assert "\x1b" not in line


@pytest.mark.parametrize("case", ["syntax error", "no get_config"])
def test_config_file_that_does_not_load(tmp_path, capsys, case):
    path = tmp_path / "bad_config.py"
    path.write_text("def get_config(:\n" if case == "syntax error" else "CONFIG = 1\n")
    named = "line 1" if case == "syntax error" else "get_config()"
    result = run_module("-m", "flowfeat_jax.main", "--config", str(path), f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert_one_line(result.stderr, "flowfeat_jax.main", str(path), named)
    argv = ["--pth", str(tmp_path / "none.pth"), "--out", str(tmp_path / "out"), "--config", str(path)]
    assert tool_main("import_torch")(argv) == 1
    assert_one_line(capsys.readouterr().err, "import_torch", str(path), named)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing folder", "broken config.json"])
def test_encoder_that_cannot_be_read(tmp_path, case):
    encoder = tmp_path / "encoder"
    if case == "broken config.json":
        encoder.mkdir()
        (encoder / "config.json").write_text("{not json")
    config = tiny_config()
    config.model.encoder = str(encoder)
    status, stderr = guarded_train(config, tmp_path / "run")
    assert status == 1
    named = str(encoder) if case == "missing folder" else str(encoder / "config.json")
    assert_one_line(stderr, "flowfeat_jax.main", "model.encoder", named)
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("case", ["invalid json", "wrong counts", "garbage over a shard"])
def test_damaged_export_is_named(exported, tmp_path, case):
    damaged = tmp_path / "flow"
    shutil.copytree(exported, damaged)
    culprit = damaged / "manifest.json"
    if case == "invalid json":
        culprit.write_text(culprit.read_text()[:-20])
    elif case == "wrong counts":
        manifest = json.loads(culprit.read_text())
        manifest["num_pairs"] += 4
        culprit.write_text(json.dumps(manifest))
    else:
        culprit = min(damaged.glob("flows-*.array_record"))
        data = bytearray(culprit.read_bytes())
        data[100:] = np.random.default_rng(0).integers(0, 256, len(data) - 100, dtype=np.uint8).tobytes()
        culprit.write_bytes(bytes(data))
    before = file_hashes(damaged)
    status, stderr = guarded_train(records_config(damaged), tmp_path / "run")
    assert status == 1
    named = {"invalid json": "not valid JSON", "wrong counts": "num_pairs"}.get(case, "damaged")
    assert_one_line(stderr, "flowfeat_jax.main", str(culprit), named)
    assert file_hashes(damaged) == before and not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--frame-size", "0"], ["frame_size", ">= 1"]),
        (["--min-frames", "40"], ["no usable videos", "min_frames=40", "clip"]),  # every video too short: exit 1
    ],
)
def test_export_flow_bad_sizes_and_nothing_usable(videos, tmp_path, capsys, args, named):
    argv = ["--videos", str(videos), "--out", str(tmp_path / "flow"), *EXPORT_ARGS, *args]
    assert tool_main("export_flow")(argv) == 1
    assert_one_line(capsys.readouterr().err, "export_flow", *named)
    assert not (tmp_path / "flow").exists()


@pytest.mark.slow
def test_evaluate_flags_are_checked_before_any_work(disk_full_run, tmp_path):
    result = run_module(
        "-m", "flowfeat_jax.evaluate", f"--workdir={disk_full_run[0]}", f"--davis={DEMO_CLIP}", "--split=demo",
        f"--out={tmp_path / 'eval'}", "--short_side=13", "--max_frames=1", "--protocols=knn,bogus",
    )
    assert result.returncode == 1
    assert_one_line(result.stderr, "flowfeat_jax.evaluate", "--short_side", ">= 28", "--max_frames", "--protocols")
    assert not (tmp_path / "eval").exists()


# A real full disk: a 2.5 MB tmpfs holds checkpoint 3 (about 1.6 MB) but not checkpoint 6.
@pytest.mark.slow
def test_real_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(disk)], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not permitted'})")
    try:
        tiny = config_flags({
            **TINY_MODEL, "data.source": "synthetic", "data.frame_size": 112, "data.flow_size": 56,
            "train.input_size": 56, "train.batch_size": 2, "train.num_steps": 6, "train.log_every": 1,
            "train.checkpoint_every": 3, "eval.davis": ""})
        command = ["-m", "flowfeat_jax.main", "--config", "configs/demo.py", f"--workdir={disk / 'run'}", *tiny]
        result = run_module(*command)
        assert result.returncode == 1
        assert_one_line(result.stderr, "flowfeat_jax.main", "cannot write", str(disk / "run" / "checkpoints"),
                        "No space left")
        assert "Event loop is closed" not in result.stderr
        kept = file_hashes(disk / "run" / "checkpoints" / "3")
        moved = shutil.copytree(disk / "run", tmp_path / "run", ignore=shutil.ignore_patterns("*orbax-checkpoint-tmp*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert file_hashes(moved / "checkpoints" / "3") == kept  # the resume itself: test_resume_with_allowed_changes...
