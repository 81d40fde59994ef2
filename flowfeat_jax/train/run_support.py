"""What a resumable training run in a workdir needs, shared by the FlowFeat loop (train/loop.py) and the dense-probe
trainer (probes/run.py): the run lock, the stop signals, the non-finite watch, saves that refuse a non-finite state,
and the resume rules (same frozen model, no changed trajectory settings, config history, metrics rows not repeated).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import signal
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowfeat_jax import errors
from flowfeat_jax.train import checkpoint as ckpt_lib


class TrainingError(errors.UserError):
    """Training cannot go on (non-finite steps, a mismatched checkpoint); the message says why."""


def make_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"cannot create workdir {workdir}: {e.strerror or e}; give a --workdir in a writable folder"
        ) from e
    return workdir


class RunLock:
    """An exclusive lock on `workdir/run.lock` (flock, released when the process ends, even killed) holding the pid
    of the run, so a second training on one workdir stops at once instead of corrupting the first's checkpoints."""

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / "run.lock"
        self._file = None

    def __enter__(self):
        if jax.process_index() != 0:  # a multi-host run shares one workdir; its first process holds the lock
            return self
        self._file = self.path.open("a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise TrainingError(
                f"{self.path}: another run (pid {holder}) is training in this workdir; wait for it to end or use "
                "another --workdir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()  # closing releases the flock; the file stays (its pid is stale, harmless)
        return False


class StopSignals:
    """SIGTERM / SIGINT set a flag instead of killing the run, so the loop can save a checkpoint first."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread; elsewhere the caller handles them
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def stopped(signal_name: str, step: int, checkpointer: ckpt_lib.Checkpointer) -> TrainingError:
    """The error that ends a run stopped by `signal_name` once the checkpoint of `step` is saved."""
    return TrainingError(
        f"stopped by {signal_name} after step {step}; checkpoint saved in {checkpointer.directory}, "
        "run the same command to resume"
    )


class NonFiniteWatch:
    """Counts consecutive non-finite steps on the host, one step behind the device so nothing waits for it.

    Args:
      limit: consecutive non-finite steps that stop the run (train.max_nonfinite).
      items: what the batch ids pushed with each step are ("videos", "images"), for the messages.
      hint: what to check, the end of the stopping error.
    """

    def __init__(self, limit: int, items: str = "videos", hint: str = "check those videos' flow or lower train.lr"):
        self.limit, self.items, self.hint = limit, items, hint
        self.bad: list[tuple[int, list[int]]] = []  # (step, batch ids) of the current run of bad steps
        self.pending: tuple[int, jax.Array, list[int]] | None = None

    def push(self, step: int, finite: jax.Array, ids: np.ndarray) -> None:
        previous, self.pending = self.pending, (step, finite, np.asarray(ids).tolist())
        if previous is not None:
            self._check(*previous)

    def flush(self) -> None:
        if self.pending is not None:
            self._check(*self.pending)
            self.pending = None

    def _check(self, step: int, finite: jax.Array, ids: list[int]) -> None:
        if bool(jax.device_get(finite)):
            self.bad = []
            return
        self.bad.append((step, ids))
        logging.warning(
            "step %d: non-finite loss, gradient or update (%s %s); state left unchanged", step, self.items, ids
        )
        if len(self.bad) >= self.limit:
            raise TrainingError(
                f"{len(self.bad)} consecutive non-finite steps, {self.bad[0][0]} to {step}; "
                f"{self.items} of step {step}: {ids}; {self.hint}"
            )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def save_checkpoint(
    checkpointer: ckpt_lib.Checkpointer, step: int, state: Any, meta: dict, data_iterator: Any = None
) -> None:
    """Saves a state only when every floating-point leaf (parameters, EMA, optimiser moments) is finite: a non-finite
    state never reaches a checkpoint (it would be resumed, exported and evaluated as if it were a model)."""
    with jax.transfer_guard("allow"):
        finite = bool(jax.device_get(_all_finite(state)))
    if not finite:
        raise TrainingError(
            f"step {step}: the train state holds non-finite values; not saved (the checkpoints in "
            f"{checkpointer.directory} are kept); check train.lr and the data"
        )
    checkpointer.save(step, state, meta, data_iterator)


def warn_half_written(directory: pathlib.Path) -> None:
    """Orbax writes into a temporary folder and renames it when done; leftovers of a killed save are ignored."""
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if "tmp" in path.name:
                logging.warning("ignoring half-written checkpoint %s (the save was interrupted)", path)
                print(f"warning: ignoring half-written checkpoint {path}", file=sys.stderr)


# Settings a resumed run may change: they decide when to log, save, stop and evaluate, not the trajectory.
RESUMABLE_CHANGES = frozenset(
    {
        "train.num_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.max_nonfinite",
        "train.allow_changes",
        "data.num_workers",
        "data.prefetch",
        "log.tensorboard",
        "log.wandb_project",
        "model.remat",  # recomputes the same values in the backward pass
        "model.encoder",  # a moved encoder folder: its weights are checked by digest (check_same_encoder)
        "features.run_dir",  # a probe's moved feature run: its weights are checked by digest likewise
    }
)
# Groups that only decide how a run is scored (a probe's PAMR refines its predictions after training).
EVALUATION_GROUPS = ("eval.", "pamr.")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def changed_settings(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """`key: old -> new` for every trajectory setting of `config` that differs from the checkpoint's config `saved`
    (keys the saved config lacks, from an older version of this code, are not compared)."""
    old, new = _flatten(saved), _flatten(json.loads(config.to_json_best_effort()))
    differ = [key for key in sorted(new) if key in old and old[key] != new[key]]
    return [
        f"{key}: {old[key]!r} -> {new[key]!r}"
        for key in differ
        if key not in RESUMABLE_CHANGES and not key.startswith(EVALUATION_GROUPS)
    ]


def resume_point(
    checkpointer: ckpt_lib.Checkpointer,
    config: ml_collections.ConfigDict,
    encoder_source: str,
    encoder_digest: str,
    workdir: pathlib.Path,
) -> tuple[int | None, list[str]]:
    """(the latest step to resume from or None, the allowed setting changes); refuses a checkpoint of another frozen
    model (by digest) and, unless train.allow_changes, one with changed trajectory settings."""
    start = checkpointer.latest_step()
    if start is None:
        return None, []
    saved_meta = checkpointer.restore_meta(start)
    ckpt_lib.check_same_encoder(saved_meta, encoder_source, encoder_digest, workdir)
    changes = changed_settings(saved_meta.get("config", {}), config) if "imported" not in saved_meta else []
    if changes and not config.train.allow_changes:
        raise TrainingError(
            f"{workdir}: resuming from step {start} with changed settings that alter the training "
            f"({'; '.join(changes)}); rerun with the checkpoint's settings, use another --workdir, or pass "
            "--config.train.allow_changes=True"
        )
    return start, changes


def read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def drop_metrics_after(path: pathlib.Path, step: int) -> None:
    """Rows logged after the checkpoint a run resumes from belong to steps it will run again (a run killed, or a
    failed save, after logging them): dropped, so the rerun does not log those steps twice."""
    rows = read_jsonl(path)
    kept = [row for row in rows if row.get("step", 0) <= step]
    if jax.process_index() == 0 and len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(path)


def begin_run(
    workdir: pathlib.Path, config: ml_collections.ConfigDict, start: int, changes: list[str], metrics_path: pathlib.Path
) -> None:
    """Once the resume checks passed (so a refused run leaves the workdir as it was): writes `config.json`, keeping
    the config an allowed change replaces as config.<start>.json; on a resume drops the metrics rows after `start`
    and says where it resumes from."""
    config_path = workdir / "config.json"
    if jax.process_index() == 0:
        if changes and config_path.is_file():
            config_path.replace(workdir / f"config.{start}.json")
        config_path.write_text(config.to_json_best_effort(indent=2) + "\n")
    if start:
        drop_metrics_after(metrics_path, start)
        print(f"resuming from step {start} ({workdir / 'checkpoints'})" + (
            f"; changed: {'; '.join(changes)} (earlier config in config.{start}.json)" if changes else ""))
