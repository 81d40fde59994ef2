"""Exact resume after SIGKILL, checkpoint-on-SIGTERM, and inspect_checkpoint (issue: reliability)."""

import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_MODEL, config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")

# The demo on the bundled clip (DIS records, grain iterator state in every checkpoint) with a tiny model.
TINY = [
    "--config",
    "configs/demo.py",
    *config_flags(TINY_MODEL),
    "--config.data.frame_size=112",
    "--config.data.flow_size=56",
    "--config.train.input_size=56",
    "--config.train.batch_size=2",
    "--config.train.num_steps=12",
    "--config.train.checkpoint_every=4",
    "--config.train.log_every=1",
    "--config.eval.davis=",
]


def main_cmd(workdir, records, *extra):
    return [
        sys.executable,
        "-m",
        "flowfeat_jax.main",
        *TINY,
        f"--workdir={workdir}",
        f"--config.data.records={records}",
        *extra,
    ]


def digest(path):
    out = subprocess.run(
        [sys.executable, "tools/inspect_checkpoint.py", str(path), "--digest"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def logged_steps(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    records = root / "flow"
    workdir = root / "full"
    subprocess.run(main_cmd(workdir, records), cwd=REPO, env=ENV, check=True, capture_output=True, timeout=900)
    return records, workdir


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_rerun_matches_uninterrupted(uninterrupted, tmp_path):
    records, full = uninterrupted
    workdir = tmp_path / "killed"
    kill_after = random.Random(0).choice([5, 6, 7])  # a step after the first checkpoint (step 4)
    proc = subprocess.Popen(
        main_cmd(workdir, records), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if logged_steps(workdir) >= kill_after and (workdir / "checkpoints" / "4").is_dir():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before_kill = logged_steps(workdir)
    assert 4 < steps_before_kill < 12, steps_before_kill
    resumed = subprocess.run(main_cmd(workdir, records), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [
        int(line.split('"step": ')[1].split(",")[0]) for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    # Resumed after the checkpoint at step 4 or 8, not from scratch; the rows the killed run logged after that
    # checkpoint were dropped, so each step is logged once.
    assert re.search(r"resuming from step (4|8)\b", resumed.stdout), resumed.stdout[-2000:]
    assert steps == list(range(1, 13)), steps
    full_lines, resumed_lines = digest(full), digest(workdir)
    assert resumed_lines[-1] == full_lines[-1]  # SHA-256 of params + EMA: bitwise equal on CPU
    assert any(line.startswith("step: 12") for line in resumed_lines)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_with_one_line(uninterrupted, tmp_path):
    records, _ = uninterrupted
    workdir = tmp_path / "term"
    proc = subprocess.Popen(
        main_cmd(workdir, records, "--config.train.num_steps=400"),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    while logged_steps(workdir) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    step = int(stderr.split("after step ")[1].split(";")[0])
    assert (workdir / "checkpoints" / str(step)).is_dir()


@pytest.mark.slow
def test_inspect_checkpoint_reports_step_encoder_and_counts(uninterrupted):
    _, full = uninterrupted
    lines = digest(full)
    text = "\n".join(lines)
    assert "step: 12 of 12" in text and "random:dinov2_vits14:seed0" in text
    assert len(lines[-1]) == 64 and all(c in "0123456789abcdef" for c in lines[-1])
    assert digest(full / "checkpoints" / "12")[-1] == lines[-1]
    assert digest(full / "checkpoints" / "8")[-1] != lines[-1]


def test_inspect_checkpoint_names_a_missing_path(tmp_path):
    out = subprocess.run(
        [sys.executable, "tools/inspect_checkpoint.py", str(tmp_path / "nope")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and str(tmp_path / "nope") in out.stderr and "Traceback" not in out.stderr
