"""Data parallelism: 4 fake CPU devices give the losses of one device for the same global batch."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
import jax
from conftest import tiny_config
from flowfeat_jax.train import loop
config = tiny_config(num_steps=3)
config.train.batch_size = 4
loop.train(config, sys.argv[1])
print(json.dumps({"devices": jax.device_count()}))
"""


def run(tmp_path, devices):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    workdir = tmp_path / f"d{devices}"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(workdir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["devices"] == devices
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_four_devices_match_one_device(tmp_path):
    one, four = run(tmp_path, 1), run(tmp_path, 4)
    assert [m["step"] for m in one] == [m["step"] for m in four] == [1, 2, 3]
    for a, b in zip(one, four):
        for key in ("loss", "flow_loss", "grad_loss", "grad_norm"):
            # Same program, same global batch; only the order of cross-device sums differs (f32 rounding).
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
