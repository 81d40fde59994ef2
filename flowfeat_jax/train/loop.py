"""The training loop: build the model and state from a config, resume, run the jitted step, log, checkpoint.

This is the one library entry that reads a whole experiment config (like big_vision's train.py); everything it calls
takes explicit arguments.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from flowfeat_jax import config as config_lib
from flowfeat_jax import errors
from flowfeat_jax.data import export, pipeline, records, synthetic
from flowfeat_jax.models import flowfeat as flowfeat_lib
from flowfeat_jax.ports.build import build_flowfeat
from flowfeat_jax.progress import progress
from flowfeat_jax.train import checkpoint as ckpt_lib
from flowfeat_jax.train import metric_writer
from flowfeat_jax.train import sharding
from flowfeat_jax.train import step as step_lib
from flowfeat_jax.train.run_support import (
    NonFiniteWatch,
    RunLock,
    StopSignals,
    TrainingError,
    begin_run,
    make_workdir,
    read_jsonl,
    resume_point,
    save_checkpoint,
    stopped,
    warn_half_written,
)


def make_optimizer(train_cfg: ml_collections.ConfigDict, random_decoder: bool) -> optax.GradientTransformation:
    """AdamW with a constant learning rate (recipe.md step 7); the random-decoder ablation never moves the decoder."""
    if random_decoder:
        return optax.set_to_zero()
    return optax.adamw(train_cfg.lr, b1=train_cfg.b1, b2=train_cfg.b2, eps=1e-8, weight_decay=train_cfg.weight_decay)


def step_config(config: ml_collections.ConfigDict) -> step_lib.StepConfig:
    """The train step's settings: config.train's crop fields and the whole config.loss and config.ema sections."""
    return step_lib.StepConfig.from_sections(config.train, config.loss, config.ema)


def init_train_state(
    decoder_params: Any, tx: optax.GradientTransformation, seed: int, flow_head: Any = None
) -> step_lib.TrainState:
    """Step 0: the EMA teacher starts as a copy of the online decoder (ema_pytorch deep-copies at construction);
    `flow_head` is the learned map of the `loss.flow_map='linear'` ablation (`initial_flow_head`)."""
    state = step_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=decoder_params,
        ema_params=jax.tree.map(jnp.copy, decoder_params),
        opt_state=None,
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
        flow_head=flow_head,
    )
    return state.replace(opt_state=tx.init(step_lib.trainable_params(state)))


def initial_flow_head(config: ml_collections.ConfigDict) -> jax.Array | None:
    """The learned flow map's start for `loss.flow_map='linear'` (Tab. 3 naive), None for the released ridge map."""
    if config.loss.flow_map != "linear":
        return None
    return step_lib.init_flow_head(config.seed, config.model.features)


def ensure_records(data_cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """The flow-record directory of a run; exports `data.videos` into it first when it holds no manifest yet.

    `data.records` defaults to `workdir/flow`. An existing export made with other parameters is refused by the
    exporter, never mixed.
    """
    records_dir = pathlib.Path(data_cfg.records) if data_cfg.records else workdir / "flow"
    export_cfg = export.ExportConfig.from_data_config(data_cfg)
    try:
        manifests = records.load_manifests(records_dir)
    except FileNotFoundError:
        if not data_cfg.videos:
            raise FileNotFoundError(
                f"{records_dir}: no flow export (manifest.json); run tools/export_flow.py or set config.data.videos"
            ) from None
    else:
        checkpoint_sha256 = records.file_sha256(data_cfg.checkpoint) if data_cfg.checkpoint else None
        differ = export.export_mismatches(
            manifests[0], export_cfg, videos_spec=data_cfg.videos or None, checkpoint_sha256=checkpoint_sha256
        )
        if differ:
            # The records decide the data; a setting they contradict would be recorded in config.json unused.
            found = "; ".join(
                f"data.{k}: the export has {was!r}, the config asks for {now!r}" for k, was, now in differ
            )
            raise ValueError(
                f"{records_dir} was exported with other data settings ({found}); set them to the export's values, or "
                "point data.records at another directory (a new one is exported from data.videos)"
            )
        return records_dir
    logging.info("exporting %s flow of %s into %s", data_cfg.method, data_cfg.videos, records_dir)
    export.export_flows(data_cfg.videos, records_dir, export_cfg)
    return records_dir


def make_batches(config: ml_collections.ConfigDict, workdir: pathlib.Path, start_step: int) -> tuple[Iterator, Any]:
    """This process's share of each global batch, and for record data the same grain iterator (checkpointed)."""
    data = config.data
    if data.source == "synthetic":
        it = synthetic.synthetic_batches(
            config.seed,
            config.train.batch_size,
            data.frame_size,
            data.flow_size,
            start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return it, None
    if data.source == "records":
        dataset = pipeline.make_pair_dataset(
            ensure_records(data, workdir),
            batch_size=config.train.batch_size // jax.process_count(),
            seed=config.seed,
            worker_count=data.num_workers,
            read_threads=data.prefetch,
            timeflip=data.timeflip,
        )
        it = iter(dataset)
        return it, it
    raise ValueError(f"config.data.source must be 'synthetic' or 'records', got {data.source!r}")


def next_on_device(batches, mesh) -> tuple[dict, dict]:
    """The next host batch and its device copy (the copy is asynchronous: it overlaps the running step)."""
    batch = next(batches)
    return batch, sharding.shard_batch(batch, mesh)


# (model with the evaluated decoder, output folder, feature kinds) -> {"eval/<protocol>/<score>": value, and
# "eval/encoder/<protocol>/<score>" when the kinds hold "encoder"}; the apps hand it over
# (flowfeat_jax.apps.validation.davis_validation), so train/ never imports eval/.
ValidateFn = Callable[[flowfeat_lib.FlowFeat, pathlib.Path, tuple[str, ...]], dict[str, float]]


class BestCheckpoint:
    """`eval.keep_best`: the checkpoint of the best validation J&F so far in `workdir/best` (one step), beside the
    latest ones in `workdir/checkpoints`, as the reference train.py keeps its best snapshots. Its meta records the
    score, so a resumed run only replaces it with a better one."""

    def __init__(self, directory: pathlib.Path, metric: str):
        self.metric = metric
        self.checkpointer = ckpt_lib.Checkpointer(directory, keep=1)
        step = self.checkpointer.latest_step()
        best = self.checkpointer.restore_meta(step).get("best", {}) if step is not None else {}
        self.step, self.value = best.get("step"), best.get("value", -float("inf"))

    def update(self, step: int, scores: dict[str, float], state: Any, meta: dict) -> bool:
        """Saves `state` when `scores[metric]` beats the best so far; returns whether it did."""
        if self.metric not in scores:
            raise TrainingError(f"eval.keep_best: validation returned no {self.metric!r} (got {sorted(scores)})")
        value = float(scores[self.metric])
        if not value > self.value or (self.step is not None and step <= self.step):
            return False
        best = {"metric": self.metric, "value": value, "step": step}
        self.checkpointer.save(step, state, {**meta, "best": best})
        self.step, self.value = step, value
        logging.info("step %d: best %s = %.4f, saved in %s", step, self.metric, value, self.checkpointer.directory)
        return True

    def close(self) -> None:
        self.checkpointer.close()


def read_pictures(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """{"pca/<sequence>": RGB uint8} of the PCA pictures an evaluation wrote."""
    return {f"pca/{p.stem}": np.asarray(Image.open(p).convert("RGB")) for p in sorted(directory.glob("*.png"))}


def evaluated_steps(path: pathlib.Path) -> set[int]:
    """Steps with a validation row in metrics.jsonl (a validation that did not finish wrote none)."""
    return {row["step"] for row in read_jsonl(path) if any(k.startswith("eval/") for k in row)}


def train(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, validate: ValidateFn | None = None
) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir` up to `config.train.num_steps`; returns the last logged metrics.

    Refused before anything in `workdir` changes: an invalid config, another run holding the workdir, data settings
    an existing export contradicts, a resume onto another encoder, or (unless train.allow_changes) a resume with
    changed trajectory settings.
    With `config.eval.davis` set, `validate` (flowfeat_jax.apps.validation, handed over by main) scores the model with the
    `eval.decoder` decoder (online by default, as the reference validates and releases it) every `eval.every` steps
    and after the last; a final validation that did not complete runs on the next invocation. `eval.keep_best` keeps
    the best checkpoint by the J&F of the first of `eval.protocols`.
    """
    config_lib.validate_config(config)
    if config.eval.davis and validate is None:
        raise ValueError("config.eval.davis is set but no validation function was given (flowfeat_jax.main gives one)")
    workdir = make_workdir(workdir)
    with RunLock(workdir):
        return _train_locked(config, workdir, validate)


def _train_locked(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, validate: ValidateFn | None
) -> dict[str, float]:
    logging.info("config:\n%s", config)
    model, encoder_source = build_flowfeat(config.model, config.seed)
    patch = model.cfg.encoder.patch_size
    try:
        flowfeat_lib.check_token_grid(config.train.input_size, config.train.input_size, patch)
    except ValueError as e:
        raise ValueError(f"train.input_size: {e}") from None
    if config.eval.davis:
        protocols = [p for p in config.eval.protocols.split(",") if p]
        short_side, max_frames = config.eval.short_side, config.eval.max_frames
        config_lib.raise_problems(config_lib.check_eval_options(protocols, short_side, max_frames, patch_size=patch))
    if config.data.source == "records":
        ensure_records(config.data, workdir)  # a mismatched export is refused here, before any training
    graphdef, model_state = nnx.split(model)
    pure = nnx.to_pure_dict(model_state)
    encoder_params, decoder_params = pure["encoder"], pure["decoder"]
    encoder_digest = ckpt_lib.tree_digest(encoder_params)
    tx = make_optimizer(config.train, config.model.random_decoder)
    state = init_train_state(decoder_params, tx, config.seed, initial_flow_head(config))
    meta = {
        "config": json.loads(config.to_json_best_effort()),
        "encoder": {"source": encoder_source, "digest": encoder_digest},
        "model": {"flowfeat": repr(model.cfg)},
    }

    warn_half_written(workdir / "checkpoints")
    mesh = sharding.data_mesh()
    sharding.local_batch_size(config.train.batch_size, mesh)  # fails early on a batch that does not split
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    start, changes = resume_point(checkpointer, config, encoder_source, encoder_digest, workdir)
    batches, data_iterator = make_batches(config, workdir, start or 0)
    if start is not None:
        state, _ = checkpointer.restore(start, ckpt_lib.abstract_like(state), data_iterator)
        logging.info("resumed from %s at step %d", checkpointer.directory, start)
    start = int(state.step)
    metrics_path = workdir / "metrics.jsonl"
    begin_run(workdir, config, start, changes, metrics_path)
    best = None
    if config.eval.davis and config.eval.keep_best:
        best = BestCheckpoint(workdir / "best", f"eval/{config.eval.protocols.split(',')[0]}/JF_mean")
    state, encoder_params = sharding.replicate((state, encoder_params), mesh)

    train_step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, step_config(config)))
    num_steps, batch_size = config.train.num_steps, config.train.batch_size
    last: dict[str, float] = {}
    watch = NonFiniteWatch(config.train.max_nonfinite)
    bar = progress(
        range(start, num_steps),
        initial=start,
        total=num_steps,
        desc="train",
        unit="step",
        disable=jax.process_index() > 0,
    )
    tick, tick_step = time.perf_counter(), start
    writer = metric_writer.MetricWriter(workdir, tensorboard=config.log.tensorboard,
                                        wandb_project=config.log.wandb_project,
                                        config=json.loads(config.to_json_best_effort()),
                                        enabled=jax.process_index() == 0)

    def validate_and_log(state, step: int, kinds: tuple[str, ...]) -> dict[str, float]:
        decoder = state.params if config.eval.decoder == "online" else state.ema_params
        model = nnx.merge(graphdef, {"encoder": encoder_params, "decoder": decoder})
        eval_dir = workdir / "eval" / f"step_{step}"
        scores = validate(model, eval_dir, kinds)
        if best is not None and best.update(step, scores, state, meta):
            scores = {**scores, "eval/best_step": step}
        writer.scalars(step, scores)
        writer.images(step, read_pictures(eval_dir / "pca"))
        return scores

    try:
        with StopSignals() as stop:
            try:
                pending = None  # the next batch, pulled and sent to the device while this step runs
                for step in bar:
                    batch, device_batch = pending or next_on_device(batches, mesh)
                    with jax.transfer_guard("disallow"):
                        state, metrics = train_step(state, device_batch, encoder_params)
                    done = step + 1
                    stopping = stop.received  # read once: a checkpoint's data state never includes a pulled batch
                    saving = done % config.train.checkpoint_every == 0 or done == num_steps or stopping
                    pending = None if saving else next_on_device(batches, mesh)
                    watch.push(done, metrics["finite"], batch["video"])
                    if done % config.train.log_every == 0 or done == num_steps:
                        watch.flush()
                        now = time.perf_counter()
                        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        last["img_per_s"] = batch_size * (done - tick_step) / max(now - tick, 1e-9)
                        tick, tick_step = now, done
                        writer.scalars(done, last)
                        bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['img_per_s']:.1f}")
                    if saving:
                        save_checkpoint(checkpointer, done, state, meta, data_iterator)
                    if stopping:
                        raise stopped(stopping, done, checkpointer)
                    every = config.eval.every
                    if config.eval.davis and every and done % every == 0 and done != num_steps:
                        last.update(validate_and_log(state, done, ("flowfeat",)))
            finally:
                checkpointer.close()
        final = int(jax.device_get(state.step))
        # The final validation, also when an earlier invocation trained to the end but did not finish validating;
        # the frozen encoder's score never changes, so it is computed once, beside the final FlowFeat one.
        if config.eval.davis and final >= num_steps and final not in evaluated_steps(metrics_path):
            last.update(validate_and_log(state, final, ("encoder", "flowfeat")))
    finally:
        writer.close()
        if best is not None:
            best.close()
    return last
