"""The DAVIS experiment (flowfeat_jax/apps/experiment.py, tools/experiment_davis.py, configs/davis_small*.py), smoke size."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flowfeat_jax.apps import experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, *args):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def fake_results(encoder, untrained, flowfeat):
    def scores(jf):
        return {"JF_mean": jf, "J_mean": jf - 0.05, "F_mean": jf + 0.05}

    return {
        row: {"knn": scores(v), "linear": scores(v / 2)}
        for row, v in zip(experiment.ROWS, (encoder, untrained, flowfeat))
    }


def test_configs_resolve_the_davis_root_relative_to_the_repo():
    config = load_config("davis_small")
    assert config.data.videos == f"{REPO.parent / 'shared' / 'data' / 'davis2016'}:train"
    assert load_config("davis_small", "data/davis").data.videos == f"{REPO / 'data' / 'davis'}:train"
    assert load_config("davis_small", "/d/davis").data.videos == "/d/davis:train"
    gpu = load_config("davis_small_gpu")
    assert gpu.data.videos == config.data.videos and gpu.train.batch_size > config.train.batch_size
    assert config.eval.davis == "" and config.loss.ridge_alpha == 0.1 and config.loss.flow_weight == 0.1


def test_davis_root_of_drops_only_a_split_suffix():
    assert experiment.davis_root_of("/data/davis2016:train") == "/data/davis2016"
    assert experiment.davis_root_of("/data/davis2016") == "/data/davis2016"
    assert experiment.davis_root_of("C:/x/davis") == "C:/x/davis"


def test_table_bolds_the_best_jf_per_protocol_and_chart_has_one_bar_per_row(tmp_path):
    results = fake_results(0.3, 0.4, 0.6)
    table = experiment.results_markdown(results).splitlines()
    assert len(table) == 2 + 3 and table[-1].startswith("| FlowFeat (trained) | **0.600** | 0.550 | 0.650 |")
    assert "**" not in table[2] and "**" not in table[3]
    experiment.bar_chart(results, tmp_path / "chart.png")
    image = np.asarray(Image.open(tmp_path / "chart.png").convert("RGB"))
    for row in experiment.ROWS:  # every row's colour is drawn, the best bar tallest
        assert (image == experiment.ROW_COLOURS[row]).all(axis=-1).sum() > 100
    heights = {row: (image == experiment.ROW_COLOURS[row]).all(axis=-1).any(axis=1).sum() for row in experiment.ROWS}
    assert heights["flowfeat"] > heights["untrained"] > heights["encoder"]


@pytest.mark.slow
def test_experiment_cli_end_to_end_smoke(davis_root, davis_clips, tmp_path):
    """Export 2 clips, 2 train steps, then 3 feature kinds x 2 protocols on a val sequence of 5 frames."""
    workdir, out = tmp_path / "run", tmp_path / "out"
    args = [
        sys.executable,
        "tools/experiment_davis.py",
        f"--config=configs/davis_small.py:{davis_root}",
        f"--workdir={workdir}",
        f"--out={out}",
        f"--davis={davis_root}",
        f"--config.data.videos={davis_clips}",
        "--config.train.num_steps=2",
        "--config.train.batch_size=2",
        "--config.train.input_size=56",
        "--config.data.frame_size=112",
        "--config.data.flow_size=56",
        "--config.train.log_every=1",
        "--config.eval.short_side=56",
        "--config.eval.max_frames=5",
        "--config.eval.sequences=blackswan",
    ]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(args, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads((out / "results.json").read_text())
    assert facts["step"] == 2 and facts["sequences"] == ["blackswan"] and facts["short_side"] == 56
    for row in experiment.ROWS:
        for protocol in ("knn", "linear"):
            assert 0.0 <= facts["results"][row][protocol]["JF_mean"] <= 1.0
    assert len((out / "table.md").read_text().splitlines()) == 5
    assert (out / "eval" / "untrained" / "flowfeat" / "knn" / "SCORES.json").is_file()
    pca = np.asarray(Image.open(out / "pca.png"))
    assert pca.shape == (16 + 56 + 4, 4 * 56, 3)  # a title strip, then 4 columns at the 56 x 56 input
    assert Image.open(out / "bar_chart.png").size[0] > 400 and (out / "loss.png").is_file()


def test_experiment_cli_names_a_missing_davis_root(tmp_path):
    args = [
        sys.executable,
        "tools/experiment_davis.py",
        "--config=configs/davis_small.py",
        f"--workdir={tmp_path}",
        f"--davis={tmp_path / 'nowhere'}",
    ]
    result = subprocess.run(args, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "nowhere: no such DAVIS root" in result.stderr


@pytest.mark.parametrize("bad", ["/data/davis:val"])
def test_davis_root_of_keeps_any_split_name(bad):
    assert experiment.davis_root_of(bad) == "/data/davis"
