"""tools/benchmark.py on a tiny config: the JSON schema, positive numbers, and JAX and torch doing the same work
(same FLOPs, the same first-step loss from the same weights, batch and crops)."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import TINY_MODEL

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "benchmark.py"
SIDE_KEYS = {"compile_s", "train_step_ms", "train_img_per_s", "infer_ms", "infer_ms_batch", "peak_mem_mb",
             "flops_per_img", "mfu"}
TOP_KEYS = {"device", "config", "batch", "size", "dtype", "jax"}
# The tiny model (conftest.TINY_MODEL) at 28 px crops; the hub name exercises the offline random-init replacement.
TINY_CONFIG = f'''
from flowfeat_jax.config import base_config

TINY_MODEL = {TINY_MODEL!r}


def get_config():
    c = base_config()
    c.model.encoder = "facebook/dinov2-small"
    c.model.encoder_arch = "dinov2_vits14"
    c.update_from_flattened_dict(TINY_MODEL)
    c.data.frame_size = 56
    c.data.flow_size = 28
    c.train.input_size = 28
    c.train.batch_size = 2
    return c
'''


def run_tool(tmp_path, cache_dir, *extra):
    out = tmp_path / f"bench{'_torch' if '--torch' in extra else ''}.json"
    # The second run loads the first one's executables from the persistent cache: a CI-sized test.
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, str(TOOL), "--config", str(tmp_path / "tiny_bench.py"), "--steps", "3",
                           "--out", str(out), *extra], check=False, capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "train_step_ms" in proc.stdout  # the printed table
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench")
    (tmp_path / "tiny_bench.py").write_text(TINY_CONFIG)
    cache = tmp_path / "xla_cache"
    return run_tool(tmp_path, cache), run_tool(tmp_path, cache, "--torch")


def check_side(side, timed_keys):
    assert SIDE_KEYS <= set(side)
    for key in timed_keys:
        assert side[key] is not None and math.isfinite(side[key]) and side[key] > 0, (key, side[key])
    assert side["train_step_ms_p10"] <= side["train_step_ms"] <= side["train_step_ms_p90"]
    # Batch / (median step time) is the throughput.
    assert side["train_img_per_s"] == pytest.approx(2 / (side["train_step_ms"] / 1e3), rel=1e-6)


@pytest.mark.slow
def test_jax_only_run_writes_the_schema(results):
    result, _ = results
    assert TOP_KEYS <= set(result) and "torch" not in result
    assert (result["batch"], result["size"], result["dtype"]) == (2, [28, 28], "f32")
    assert result["device"].startswith("cpu")
    check_side(result["jax"], ["compile_s", "train_step_ms", "train_img_per_s", "infer_ms", "infer_ms_batch",
                               "flops_per_img"])
    assert result["jax"]["mfu"] is None and result["jax"]["peak_mem_mb"] is None  # no peak / no stats on CPU
    assert any("random init" in note for note in result["notes"])
    # The train step runs the encoder on 2 crops and the decoder 2x forward + backward: far more than one forward.
    assert result["jax"]["flops_per_img"] > 2 * result["jax"]["infer_flops_per_img"]


@pytest.mark.slow
def test_torch_side_does_the_same_work(results):
    jax_only, result = results
    assert TOP_KEYS | {"torch"} <= set(result)
    check_side(result["torch"], ["train_step_ms", "train_img_per_s", "infer_ms", "infer_ms_batch", "flops_per_img"])
    jax_side, torch_side = result["jax"], result["torch"]
    assert torch_side["compile_s"] is None  # eager
    assert torch_side["flops_per_img"] == pytest.approx(jax_side["flops_per_img"], rel=0.15)
    assert torch_side["infer_flops_per_img"] == pytest.approx(jax_side["infer_flops_per_img"], rel=0.15)
    assert torch_side["first_loss"] == pytest.approx(jax_side["first_loss"], rel=1e-4, abs=1e-5)
    assert jax_only["jax"]["first_loss"] == pytest.approx(jax_side["first_loss"], rel=1e-6)  # the same program


def test_unknown_config_is_a_one_line_error(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--config", "no_such_config", "--out", str(tmp_path / "b.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("benchmark: error: no config file 'no_such_config'") and "\n" not in err
    assert not (tmp_path / "b.json").exists()


def load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_config_overrides_as_for_main(tmp_path, capsys):
    """`--config.KEY=VALUE` reaches the config with the key's type kept; a misspelled key or a value of the wrong
    type is a one-line error naming the override, before any work."""
    from flowfeat_jax import cli
    from flowfeat_jax.config import load_config

    tool = load_tool()
    args, overrides = tool.parse_args(["--config", "demo", "--out", "b.json", "--config.train.batch_size=3",
                                       "--config.model.dtype=bfloat16"])
    config = cli.apply_config_overrides(load_config(args.config), overrides)
    assert (config.train.batch_size, config.model.dtype) == (3, "bfloat16")
    for bad, named in (("--config.train.batch_sise=3", "batch_sise"), ("--config.train.batch_size=two", "two")):
        assert tool.main(["--config", "demo", "--out", str(tmp_path / "b.json"), bad]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"benchmark: error: config override {bad}") and named in err and "\n" not in err
    assert not (tmp_path / "b.json").exists()
    with pytest.raises(SystemExit):  # anything else unknown stays argparse's usage error
        tool.parse_args(["--config", "demo", "--out", "b.json", "--batchsize", "3"])
