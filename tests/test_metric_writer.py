"""MetricWriter: metrics.jsonl, TensorBoard events read back (tags, steps, values, pictures), optional W&B."""

import json
import sys
import types

import numpy as np
import pytest
from conftest import read_tensorboard_events

from flowfeat_jax.train.metric_writer import MetricWriter


def test_scalars_and_pictures_are_written_and_read_back(tmp_path):
    writer = MetricWriter(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing is created before the first write
    writer.scalars(10, {"loss": 0.5, "grad_norm": 2.0})
    writer.scalars(20, {"loss": 0.25, "grad_norm": 1.0})
    picture = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    writer.scalars(20, {"eval/knn/JF_mean": 0.375})
    writer.images(20, {"pca/blackswan": picture})
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 10, "loss": 0.5, "grad_norm": 2.0}, {"step": 20, "loss": 0.25, "grad_norm": 1.0},
                     {"step": 20, "eval/knn/JF_mean": 0.375}]
    events = read_tensorboard_events(tmp_path)
    scalars = {(step, tag): value for step, tag, value in events if not isinstance(value, np.ndarray)}
    assert scalars == {(10, "train/loss"): 0.5, (10, "train/grad_norm"): 2.0, (20, "train/loss"): 0.25,
                       (20, "train/grad_norm"): 1.0, (20, "eval/knn/JF_mean"): 0.375}
    (step, tag, image), = [e for e in events if isinstance(e[2], np.ndarray)]
    assert (step, tag) == (20, "pca/blackswan")
    np.testing.assert_array_equal(image, picture)


def test_tensorboard_off_and_other_processes_write_no_events(tmp_path):
    writer = MetricWriter(tmp_path / "a", tensorboard=False)
    (tmp_path / "a").mkdir()
    writer.scalars(1, {"loss": 1.0})
    writer.close()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["metrics.jsonl"]
    silent = MetricWriter(tmp_path / "b", enabled=False)
    silent.scalars(1, {"loss": 1.0})
    silent.images(1, {"pca/x": np.zeros((2, 2, 3), np.uint8)})
    silent.close()
    assert not (tmp_path / "b").exists()


def test_wandb_gets_the_same_scalars_and_pictures(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append((step, values))

        def finish(self):
            calls.append("finish")

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or Run(), Image=lambda a: ("image", a.shape))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = MetricWriter(tmp_path, tensorboard=False, wandb_project="flowfeat", config={"seed": 0})
    writer.scalars(5, {"loss": 0.5})
    writer.images(5, {"pca/x": np.zeros((2, 3, 3), np.uint8)})
    writer.close()
    assert calls[0]["project"] == "flowfeat" and calls[0]["config"] == {"seed": 0}
    assert calls[1:] == [(5, {"loss": 0.5}), (5, {"pca/x": ("image", (2, 3, 3))}), "finish"]


def test_wandb_project_without_wandb_is_refused_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match="log.wandb_project='p': wandb is not installed"):
        MetricWriter(tmp_path, wandb_project="p")
    assert not list(tmp_path.iterdir())
