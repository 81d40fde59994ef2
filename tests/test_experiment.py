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

from flowfeat_jax import config as config_lib
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


def tiny_sweep_config(davis_root, davis_clips):
    config = load_config("davis_ablations", str(davis_root))
    config.data.videos = str(davis_clips)
    config.train.num_steps = 2
    config.train.batch_size = 2
    config.train.input_size = 56
    config.train.checkpoint_every = 2
    config.data.frame_size = 112
    config.data.flow_size = 56
    config.eval.short_side = 56
    config.eval.max_frames = 4
    return config


@pytest.mark.slow
def test_ablation_sweep_trains_every_setting_and_seed_once_and_shares_exports(davis_root, davis_clips, tmp_path):
    """2 settings x 2 seeds at smoke size: the overrides reach the runs, one flow export per gap, a second call
    reuses every run and score, and the table / chart / json hold one row per setting and control."""
    config = tiny_sweep_config(davis_root, davis_clips)
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    kwargs = dict(ablations=("full", "next_frame"), seeds=(0, 1), sequences=["blackswan"], protocols=("knn",))
    facts = experiment.run_ablation_sweep(config, sweep, out, davis_root, **kwargs)
    assert [(r["ablation"], r["seed"]) for r in facts["runs"]] == [
        ("full", 0), ("next_frame", 0), ("full", 1), ("next_frame", 1)]
    assert sorted(p.name for p in (sweep / "flow").iterdir()) == ["gap1", "gap2"]  # shared by the seeds
    assert not (sweep / "full" / "seed0" / "flow").exists()
    run_config = json.loads((sweep / "next_frame" / "seed1" / "config.json").read_text())
    assert run_config["seed"] == 1 and run_config["data"]["gap"] == 1 and run_config["data"]["timeflip"] is False
    assert json.loads((sweep / "full" / "seed0" / "config.json").read_text())["data"]["gap"] == 2
    summary = facts["summary"]
    assert set(summary) == {"full", "next_frame", "encoder", "untrained"}
    for name, by_protocol in summary.items():
        values = by_protocol["knn"]["values"]
        assert len(values) == 2 and all(0 <= v <= 100 for v in values)
        assert by_protocol["knn"]["mean"] == pytest.approx(np.mean(values), abs=1e-3)
    assert summary["full"]["knn"]["delta"] == 0.0
    table = (out / "ablations.md").read_text()
    assert "2 steps of batch 2" in table and "next-frame pairs only" in table and "untrained decoder" in table
    assert len((out / "ablations.csv").read_text().splitlines()) == 1 + 4 * 2
    assert Image.open(out / "ablations.png").size[0] > 400
    stamps = {p: p.stat().st_mtime_ns for p in sweep.glob("*/seed*/scores.json")}
    again = experiment.run_ablation_sweep(config, sweep, out, davis_root, **kwargs)  # resumable: nothing reruns
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("*/seed*/scores.json")} == stamps
    assert again["summary"] == summary


def test_sweep_summary_pairs_each_setting_with_full_of_the_same_seed():
    rows = {"full": {"knn": [0.30, 0.40, 0.50]}, "l2": {"knn": [0.28, 0.37, 0.49]}}
    summary = experiment.summarize_sweep(rows, ["knn"])
    assert summary["l2"]["knn"]["delta"] == pytest.approx(-2.0)
    assert summary["l2"]["knn"]["delta_sd"] == pytest.approx(1.0)  # per-seed deltas -2, -3, -1
    assert summary["full"]["knn"]["sd"] == pytest.approx(10.0)  # the spread between seeds, not in the delta
    table = experiment.sweep_markdown(summary, ["knn"]).splitlines()
    assert table[2].startswith("| full (released loss, ridge map) | 0 | 40.0 ± 10.0 |")
    assert table[3] == "| L2 instead of L1 | -2.4 | 38.0 ± 10.5 | -2.0 ± 1.0 |"


def test_ablation_settings_are_valid_configs_and_unknown_names_fail():
    base = load_config("davis_ablations")
    for name, ablation in experiment.ABLATIONS.items():
        run = experiment.ablation_config(base, name, 2, pathlib.Path("/tmp/flow"))
        config_lib.validate_config(run)
        assert run.seed == 2 and all(run[k.split(".")[0]][k.split(".")[1]] == v for k, v in ablation.overrides.items())
    with pytest.raises(ValueError, match="unknown ablation 'l3'"):
        experiment.ablation_config(base, "l3", 0, pathlib.Path("/tmp"))
    result = subprocess.run(
        [sys.executable, "tools/experiment_davis.py", "--config=configs/davis_ablations.py", "--ablations=l3",
         "--workdir=/nonexistent/x"], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--ablations: unknown l3" in result.stderr
