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

import numpy as np
import pytest
import torch
from etils import epath
from PIL import Image
from test_train_loop import tiny_config

from flowfeat_jax import cli
from flowfeat_jax.data import export, pipeline, records
from flowfeat_jax.torch_ref.flowfeat import TorchFlowFeat, TorchFlowFeatConfig
from flowfeat_jax.torch_ref.vit import HubViTConfig
from flowfeat_jax.train import loop

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


def guarded_train(config, workdir) -> tuple[int, str]:
    """loop.train under cli.run_guarded as flowfeat_jax.main runs it: (exit status, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.run_guarded(lambda: loop.train(config, workdir), prog="flowfeat_jax.main", verbose=False)
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
    assert tool_main("import_torch")(["--pth", str(pth), "--out", str(tmp_path / "run")]) == 1
    assert_one_line(capsys.readouterr().err, "import_torch", key or str(pth))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]  # nothing written
