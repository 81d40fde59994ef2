"""Where a run's metrics go: metrics.jsonl, TensorBoard event files beside it, and W&B when configured.

TensorBoard files are written with tensorboardX (protobuf only, no TensorFlow), like the clu / big_vision writers of
JAX code bases; W&B (what the reference logs to) only when `log.wandb_project` names a project and wandb is installed.
Scalar tags are the metrics.jsonl keys; keys without a group get `train/` (`loss` -> `train/loss`,
`eval/knn/JF_mean` stays). Files are opened on the first write, so a run refused before training leaves none.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"


def tensorboard_tag(key: str) -> str:
    return key if "/" in key else f"train/{key}"


class MetricWriter:
    """Writes scalars (every logged step, validation scores) and pictures to every configured sink.

    Args:
      workdir: the run directory (metrics.jsonl and the event files go there).
      tensorboard: also write TensorBoard event files.
      wandb_project: a W&B project name ('' = no W&B); wandb must then be installed.
      config: the run's config as a plain dict (stored by W&B with the run).
      enabled: False on every process but the first of a multi-host run (one writer).
      jsonl_name: the name of the scalars file in `workdir` (a probe run logs to train_log.jsonl beside the
        metrics.json of its evaluation).
    """

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, wandb_project: str = "",
                 config: Mapping[str, Any] | None = None, enabled: bool = True, jsonl_name: str = METRICS_FILE):
        self.workdir = pathlib.Path(workdir)
        self.jsonl_path = self.workdir / jsonl_name
        self.enabled = enabled
        self._config = dict(config or {})
        self._tensorboard, self._wandb_project = tensorboard, wandb_project
        self._tb = self._wandb_run = None
        if wandb_project and enabled:
            try:
                import wandb  # noqa: F401  (optional: checked before any work starts)
            except ImportError:
                raise ValueError(
                    f"log.wandb_project={wandb_project!r}: wandb is not installed; `pip install wandb` or leave it empty"
                ) from None

    def _sinks(self):
        if self._tensorboard and self._tb is None:
            from tensorboardX import SummaryWriter  # optional sink: loaded only when asked for

            self._tb = SummaryWriter(logdir=str(self.workdir), flush_secs=30)
        if self._wandb_project and self._wandb_run is None:
            import wandb  # optional, not a pinned dependency

            self._wandb_run = wandb.init(project=self._wandb_project, name=self.workdir.name, dir=str(self.workdir),
                                         config=self._config)
        return self._tb, self._wandb_run

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One metrics.jsonl line {"step": step, **values}, one TensorBoard scalar per value, one W&B log call."""
        if not self.enabled:
            return
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        tb, run = self._sinks()
        if tb is not None:
            for key, value in values.items():
                tb.add_scalar(tensorboard_tag(key), value, step)
        if run is not None:
            run.log(dict(values), step=step)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 pictures (H, W, 3) under their tags (TensorBoard and W&B; metrics.jsonl holds numbers only)."""
        if not self.enabled or not images:
            return
        tb, run = self._sinks()
        if tb is not None:
            for tag, image in images.items():
                tb.add_image(tag, np.asarray(image), step, dataformats="HWC")
        if run is not None:
            import wandb  # optional, not a pinned dependency

            run.log({tag: wandb.Image(np.asarray(image)) for tag, image in images.items()}, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
