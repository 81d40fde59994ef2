"""The README's main command (the demo) and the evaluate CLI, end to end as a user runs them."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import read_tensorboard_events
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_module(module, *args):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo with 4 steps instead of 150 and validation on the clip's first 6 frames."""
    workdir = tmp_path_factory.mktemp("demo")
    result = run_module(
        "flowfeat_jax.main",
        "--config",
        "configs/demo.py",
        f"--workdir={workdir}",
        "--config.train.num_steps=4",
        "--config.train.checkpoint_every=2",
        "--config.eval.max_frames=6",
    )
    (workdir.parent / f"{workdir.name}_stdout.txt").write_text(result.stdout)
    (workdir.parent / f"{workdir.name}_stderr.txt").write_text(result.stderr)
    return workdir


@pytest.mark.slow
def test_demo_exports_trains_checkpoints_scores_and_draws(demo_run):
    manifest = json.loads((demo_run / "flow" / "manifest.json").read_text())
    assert manifest["method"] == "dis" and manifest["num_videos"] == 1 and manifest["num_frames"] == 16
    assert sorted(p.name for p in (demo_run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    records = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4]  # log_every 10 > num_steps: the last step is logged
    score = [r for r in records if "eval/knn/JF_mean" in r][-1]
    assert score["step"] == 4 and 0.0 <= score["eval/knn/JF_mean"] <= 1.0
    picture = np.asarray(Image.open(demo_run / "eval" / "step_4" / "pca" / "blackswan.png"))
    assert picture.shape == (224, 3 * 392, 3)  # frame | encoder PCA | FlowFeat PCA at the 224 x 392 input
    assert (demo_run / "eval" / "step_4" / "flowfeat" / "knn" / "SCORES.json").is_file()
    assert 0.0 <= score["eval/encoder/knn/JF_mean"] <= 1.0  # the final validation scores the encoder too


@pytest.mark.slow
def test_demo_ends_with_encoder_vs_flowfeat_table_and_picture_paths(demo_run):
    stdout = (demo_run.parent / f"{demo_run.name}_stdout.txt").read_text()
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| features | protocol | J&F | J | F |"
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table[2:]}
    assert set(rows) == {("encoder", "knn"), ("flowfeat", "knn")}
    for row in rows.values():
        assert 0.0 <= float(row.split("|")[3]) <= 1.0
    assert str(demo_run / "eval" / "step_4" / "pca" / "blackswan.png") in stdout.splitlines()[-1]
    assert (demo_run / "eval" / "step_4" / "table.md").read_text().splitlines() == table
    stderr = (demo_run.parent / f"{demo_run.name}_stderr.txt").read_text()  # a pipe, not a terminal
    assert "\r" not in stderr and "\x1b" not in stderr
    assert any(line.startswith("train: 100%") and "4/4" in line for line in stderr.splitlines())


@pytest.mark.slow
def test_demo_writes_tensorboard_events(demo_run):
    events = read_tensorboard_events(demo_run)
    tags = {(step, tag) for step, tag, _ in events}
    assert {(4, "train/loss"), (4, "train/grad_norm"), (4, "train/ema_decay"), (4, "train/img_per_s"),
            (4, "eval/knn/JF_mean"), (4, "eval/encoder/knn/JF_mean"), (4, "pca/blackswan")} <= tags
    (picture,) = [value for step, tag, value in events if tag == "pca/blackswan"]
    assert picture.shape == (224, 3 * 392, 3)


def readme_python_blocks(containing: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    return [block for block in blocks if containing in block]


@pytest.mark.slow
def test_readme_python_snippets_run_on_the_demo_run_and_its_export(demo_run):
    """The README's load() example and its PyTorch example (on the demo's own export), pasted as written, with
    runs/demo pointing at this run."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    export = subprocess.run([sys.executable, "tools/export_torch.py", "--checkpoint", str(demo_run), "--out",
                             str(demo_run / "flowfeat.pth")], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=env)
    assert export.returncode == 0, export.stderr[-3000:]
    assert "at no decoder input size" in export.stdout and "37x37" in export.stdout  # the note names no invalid size
    (load_block,) = readme_python_blocks("flowfeat_jax.load(")
    (torch_block,) = readme_python_blocks("load_torch_flowfeat(")
    script = load_block + "print(encoder.shape, flowfeat.shape)\n" + torch_block
    script = script.replace('"runs/demo', f'"{demo_run}')
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    jax_shapes, torch_shapes = result.stdout.strip().splitlines()[-2:]
    assert jax_shapes == "(18, 30, 96) (252, 420, 64)" and "(18, 30, 96), (252, 420, 64)" in load_block
    assert torch_shapes == "torch.Size([1, 96, 16, 30]) torch.Size([1, 64, 224, 420])" and torch_shapes in torch_block


@pytest.mark.slow
def test_demo_rerun_resumes_and_keeps_the_export(demo_run):
    flow_before = {p.name: p.stat().st_mtime_ns for p in (demo_run / "flow").iterdir()}
    run_module(
        "flowfeat_jax.main",
        "--config",
        "configs/demo.py",
        f"--workdir={demo_run}",
        "--config.train.num_steps=6",
        "--config.train.checkpoint_every=2",
        "--config.eval.davis=",
    )
    assert {p.name: p.stat().st_mtime_ns for p in (demo_run / "flow").iterdir()} == flow_before
    records = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 6]


@pytest.mark.slow
def test_evaluate_encoder_vs_flowfeat_on_shared_val(demo_run, davis_root, tmp_path):
    out = tmp_path / "eval"
    result = run_module(
        "flowfeat_jax.evaluate",
        f"--workdir={demo_run}",
        f"--davis={davis_root}",
        "--sequences=blackswan,car-shadow",
        "--max_frames=4",
        "--short_side=224",
        f"--out={out}",
    )
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + 4  # header, rule, {encoder, flowfeat} x {knn, linear}
    assert "| encoder | knn |" in result.stdout and "| flowfeat | linear |" in result.stdout
    for row in table[2:]:
        jf = float(row.split("|")[3])
        assert 0.0 <= jf <= 1.0
    assert (out / "pca" / "car-shadow.png").is_file()
    assert json.loads((out / "flowfeat" / "linear" / "SCORES.json").read_text())["global"]["JF_mean"] >= 0.0


def test_evaluate_reports_a_missing_checkpoint(tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(
        [sys.executable, "-m", "flowfeat_jax.evaluate", f"--workdir={tmp_path}", f"--davis={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert str(tmp_path) in result.stderr and "Traceback" not in result.stderr
