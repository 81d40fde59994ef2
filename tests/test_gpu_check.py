"""tools/gpu_check.sh --tiny: the one-call GPU check runs unchanged on a CPU, writes its JSON under $OUT and prints
its table last."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flowfeat_jax.apps import gpu_check

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--tiny"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tiny"] and result["device"].startswith("cpu")
    assert {(row["batch"], row["dtype"]) for row in result["train"]} == {(1, "f32"), (1, "bf16")}
    for row in result["train"]:
        assert row["jax_step_ms"] > 0 and row["torch_step_ms"] > 0
        jax_loss, torch_loss = row["first_loss"]  # same weights, batch and crops on both sides
        np.testing.assert_allclose(jax_loss, torch_loss, rtol=1e-4 if row["dtype"] == "f32" else 0.05)
    assert all(row["infer_ms"] > 0 and row["mem_mb"] > 0 for row in result["inference"])
    evaluation = result["eval"]
    assert evaluation["frames"] == 6 and evaluation["compiles"] > 0 and evaluation["frames_per_s"] > 0
    assert set(evaluation["scores"]["flowfeat"]) == {"knn", "linear"}
    for row in result["projection"]:
        train = next(r for r in result["train"] if r["dtype"] == row["dtype"])
        assert row["steps"] == 500 * 27
        np.testing.assert_allclose(row["hours"], 500 * 27 * train["jax_step_ms"] / 3.6e6)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("500 ep") and any(line.startswith("gpu_check") for line in lines)


def test_projection_takes_the_largest_batch_and_scales_its_step_time():
    rows = [{"dtype": dtype, "batch": batch, "jax_step_ms": ms, "torch_step_ms": 2 * ms}
            for dtype, batch, ms in (("f32", 1, 100.0), ("f32", 4, 300.0), ("bf16", 4, 150.0))]
    projected = gpu_check.projection(rows)
    assert [(row["dtype"], row["batch"], row["steps"]) for row in projected] == [("f32", 4, 13500), ("bf16", 4, 13500)]
    assert projected[0]["hours"] == pytest.approx(13500 * 0.3 / 3600)  # 500 epochs of 27 steps at 300 ms
    assert projected[1]["torch_hours"] == pytest.approx(13500 * 0.3 / 3600)
