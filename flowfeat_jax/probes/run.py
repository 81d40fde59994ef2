"""Train and evaluate a dense probe on frozen features from one experiment config (configs/probe_*.py).

`run(config, workdir)` builds the frozen feature model (a trained FlowFeat run dir, or `config.model`: an encoder by
HF name / local dir, or a random architecture for smoke runs), trains the probe with the paper's Adam (L2 weight
decay, constant lr), evaluates, and writes `metrics.json` and prediction pictures under `workdir/pictures/`. Features
are computed on the fly inside the jitted step (no gradient reaches the feature model). The task (`config.task`) is
data (probes/tasks.py); the run follows the FlowFeat loop's rules through the same machinery (train/run_support.py):
orbax checkpoints in `workdir/checkpoints` and their resume rules, the run lock, SIGTERM / SIGINT, the non-finite
guard, and the metric writer (train_log.jsonl and TensorBoard).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Callable

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flowfeat_jax import inference
from flowfeat_jax.models.vit import normalize_images
from flowfeat_jax.ports import build
from flowfeat_jax.probes import data as data_lib
from flowfeat_jax.probes import tasks as tasks_lib
from flowfeat_jax.progress import progress
from flowfeat_jax.train import checkpoint as ckpt_lib
from flowfeat_jax.train import metric_writer
from flowfeat_jax.train import run_support
from flowfeat_jax.train import step as step_lib
from flowfeat_jax.viz import save_png

FEATURE_CHOICES = ("encoder", "flowfeat", "both")
LOG_FILE = "train_log.jsonl"  # beside the metrics.json of the evaluation


def uses_flowfeat(config: ml_collections.ConfigDict) -> bool:
    """Whether the FlowFeat features are computed: for the probe (`features.which`) or for the task (PAMR)."""
    return config.features.which != "encoder" or tasks_lib.get_task(config.task).uses_flowfeat(config)


def build_feature_model(config: ml_collections.ConfigDict):
    """The frozen FlowFeat of `features.run_dir`, else one built from `config.model`; returns (model, source)."""
    if config.features.run_dir:
        model, _, step = inference.load_flowfeat(config.features.run_dir, decoder=config.features.decoder)
        return model, f"{config.features.run_dir}@{step}:{config.features.decoder}"
    model, source = build.build_flowfeat(config.model, config.seed)
    if uses_flowfeat(config):
        logging.warning("features.run_dir is empty: the FlowFeat decoder is randomly initialised (%s)", source)
    return model, source + ":random-decoder"


def make_extractor(graphdef, use_encoder: bool, use_flowfeat: bool) -> Callable:
    """extract(model_params, images uint8 (B, H, W, 3)) -> (encoder (B, h, w, C) | None, FlowFeat (B, H, W, d) | None).

    Either output is None when the probe does not use it (FlowFeat is still computed when PAMR needs it).
    """

    def extract(model_params, images):
        model = nnx.merge(graphdef, model_params)
        x = normalize_images(images)
        if use_flowfeat:
            encoder, flowfeat = model(x)
        else:
            encoder, flowfeat = model.encode(x).final, None
        return (encoder if use_encoder else None), flowfeat

    return extract


def make_probe(config: ml_collections.ConfigDict, model) -> nnx.Module:
    """The probe of `config.task` sized for the feature model's widths and `features.which`."""
    which = config.features.which
    if which not in FEATURE_CHOICES:
        raise ValueError(f"features.which must be one of {FEATURE_CHOICES}, got {which!r}")
    widths = dict(
        encoder_dim=model.cfg.encoder.hidden_size if which in ("encoder", "both") else 0,
        flowfeat_dim=model.cfg.decoder.features if which in ("flowfeat", "both") else 0,
    )
    return tasks_lib.get_task(config.task).build_probe(config, widths, nnx.Rngs(config.seed))


def check_input_size(size: int, patch_size: int) -> None:
    if size < 2 * patch_size or size % (2 * patch_size):
        multiple = 2 * patch_size
        raise ValueError(f"data.input_size {size} must be a multiple of 2 x patch {patch_size} "
                         f"(e.g. {size // multiple * multiple} or {(size // multiple + 1) * multiple})")


def input_sizes(data_cfg: ml_collections.ConfigDict, patch_size: int) -> tuple[int, int]:
    """(crop, network input) sides: the centred crop that is scored (`eval_crop`; 0 = `input_size`) and the square
    the network sees (`input_size`; 0 = the largest multiple of 2 x patch <= the crop: 256 -> 256 for patch 16, 252
    for patch 14), so one config serves both patch sizes."""
    crop = data_cfg.eval_crop or data_cfg.input_size
    size = data_cfg.input_size or crop // (2 * patch_size) * 2 * patch_size
    check_input_size(size, patch_size)
    return crop, size


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The paper's probe optimiser, torch Adam with weight decay: the L2 term joins the gradient before the moments;
    constant lr."""
    return optax.chain(optax.add_decayed_weights(train_cfg.weight_decay), optax.adam(train_cfg.lr))


# --- steps --------------------------------------------------------------------------------------------------------
def make_train_step(probe_graphdef, extract: Callable, loss: Callable, tx: optax.GradientTransformation):
    """Jitted (params, opt_state, model_params, batch) -> (params, opt_state, loss); params and opt_state donated.

    `loss(probe, encoder, flowfeat, batch)` is the task's. A step whose loss, gradient or update is not finite leaves
    params and opt_state unchanged (the guard of train/step.py) and returns a NaN loss.
    """

    def step(params, opt_state, model_params, batch):
        encoder, flowfeat = jax.lax.stop_gradient(extract(model_params, batch["image"]))

        def objective(p):
            return loss(nnx.merge(probe_graphdef, p), encoder, flowfeat, batch)

        value, grads = jax.value_and_grad(objective)(params)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        finite = step_lib.update_is_finite(value, optax.tree.norm(grads), updates)
        new_params = optax.apply_updates(params, updates)
        return (step_lib.keep_if_finite(finite, new_params, params),
                step_lib.keep_if_finite(finite, new_opt_state, opt_state), jnp.where(finite, value, jnp.nan))

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(config: ml_collections.ConfigDict, probe_graphdef, extract: Callable):
    """Jitted (params, model_params, batch) -> the task's predictions (and confusion matrices for segmentation)."""
    predict = tasks_lib.get_task(config.task).make_predict(config)

    def step(params, model_params, batch):
        encoder, flowfeat = extract(model_params, batch["image"])
        return predict(nnx.merge(probe_graphdef, params), encoder, flowfeat, batch)

    return jax.jit(step)


# --- evaluation ---------------------------------------------------------------------------------------------------
def evaluate(config, eval_step, params, model_params, num_items, load, pictures_dir: pathlib.Path) -> dict[str, Any]:
    """Runs the eval split; returns the task's metrics and writes `eval.num_pictures` prediction pictures."""
    task = tasks_lib.get_task(config.task)
    limit = min(num_items, config.eval.max_images) if config.eval.max_images else num_items
    batches = data_lib.batches(load, limit, config.eval.batch_size, num_workers=config.data.num_workers)
    scores, pictures = task.make_scores(config), 0
    for batch in progress(batches, total=-(-limit // config.eval.batch_size), desc="eval", unit="batch"):
        out = jax.device_get(eval_step(params, model_params, {k: v for k, v in batch.items() if k != "index"}))
        scores.add(batch, out)
        for b in range(len(batch["index"])):
            if pictures >= config.eval.num_pictures:
                break
            panels = task.picture_panels(config, batch, out, b)
            picture = np.concatenate([_image_panel(batch["image"][b], panels[0].shape[:2]), *panels], axis=1)
            save_png(pictures_dir / f"{pictures:03d}_{int(batch['index'][b])}.png", picture)
            pictures += 1
    return scores.result(limit)


def _image_panel(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The input image at the ground-truth size (the network may see the scored crop smaller: data.input_size)."""
    if image.shape[:2] == tuple(size):
        return image
    resized = np.asarray(jax.image.resize(image.astype(np.float32), (*size, 3), "linear"))
    return np.clip(resized, 0, 255).astype(np.uint8)


# --- driver -------------------------------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Train (or resume) the probe to `train.num_steps`, evaluate, write metrics.json; returns the metrics.

    As the FlowFeat loop: another run holding `workdir`, a resume onto other frozen features (by digest) and, unless
    train.allow_changes, a resume with changed training settings are refused before anything in `workdir` changes;
    SIGTERM / SIGINT save a checkpoint and stop (rerun to resume); a non-finite step leaves the probe unchanged and
    `train.max_nonfinite` consecutive ones stop the run; a non-finite probe is never saved.
    """
    task = tasks_lib.get_task(config.task)
    task.check(config)  # before any work
    workdir = run_support.make_workdir(workdir)
    with run_support.RunLock(workdir):
        return _run_locked(config, task, workdir)


def _run_locked(config: ml_collections.ConfigDict, task: tasks_lib.ProbeTask, workdir: pathlib.Path) -> dict[str, Any]:
    logging.info("config:\n%s", config)
    tx = make_optimizer(config.train)
    model, source = build_feature_model(config)
    crop, input_size = input_sizes(config.data, model.cfg.encoder.patch_size)
    model_graphdef, model_state = nnx.split(model)
    model_params = nnx.to_pure_dict(model_state)
    extract = make_extractor(model_graphdef, config.features.which in ("encoder", "both"), uses_flowfeat(config))

    probe = make_probe(config, model)
    probe_graphdef, probe_state = nnx.split(probe)
    params = nnx.to_pure_dict(probe_state)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    digest = ckpt_lib.tree_digest(model_params)
    meta = {"config": json.loads(config.to_json_best_effort()), "features": source, "probe": repr(probe.cfg),
            "encoder": {"source": source, "digest": digest}}  # the frozen feature model, checked on resume

    run_support.warn_half_written(workdir / "checkpoints")
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    writer = metric_writer.MetricWriter(workdir, tensorboard=config.log.tensorboard,
                                        wandb_project=config.log.wandb_project,
                                        config=json.loads(config.to_json_best_effort()), jsonl_name=LOG_FILE)
    try:
        start, changes = run_support.resume_point(checkpointer, config, source, digest, workdir)
        num_train, load_train = task.make_source(config, config.data.train_split, crop, input_size)
        if start is not None:
            state, _ = checkpointer.restore(start, ckpt_lib.abstract_like(state))
            logging.info("resumed probe from %s at step %d", checkpointer.directory, start)
        start = int(state["step"])
        run_support.begin_run(workdir, config, start, changes, workdir / LOG_FILE)

        c = config.train
        train_step = make_train_step(probe_graphdef, extract, task.make_loss(config), tx)
        stream = data_lib.batches(load_train, num_train, c.batch_size, seed=config.seed, start_batch=start,
                                  num_workers=config.data.num_workers)
        watch = run_support.NonFiniteWatch(c.max_nonfinite, items="images", hint="check those images or lower train.lr")
        params, opt_state = state["params"], state["opt_state"]
        bar = progress(range(start, c.num_steps), initial=start, total=c.num_steps, desc="probe", unit="step")
        tick, tick_step = time.perf_counter(), start
        with run_support.StopSignals() as stop:
            for step in bar:
                batch = next(stream)
                images = batch.pop("index")
                params, opt_state, loss = train_step(params, opt_state, model_params, batch)
                done = step + 1
                stopping = stop.received  # read once: the checkpoint below is of the step the error names
                watch.push(done, jnp.isfinite(loss), images)
                if done % c.log_every == 0 or done == c.num_steps:
                    watch.flush()
                    now = time.perf_counter()
                    row = {"loss": float(loss), "img_per_s": c.batch_size * (done - tick_step) / max(now - tick, 1e-9)}
                    tick, tick_step = now, done
                    writer.scalars(done, row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}")
                if done % c.checkpoint_every == 0 or done == c.num_steps or stopping:
                    state = {"step": jnp.asarray(done, jnp.int32), "params": params, "opt_state": opt_state}
                    run_support.save_checkpoint(checkpointer, done, state, meta)
                if stopping:
                    raise run_support.stopped(stopping, done, checkpointer)
    finally:
        checkpointer.close()
        writer.close()

    num_eval, load_eval = task.make_source(config, config.data.eval_split, crop, input_size)
    eval_step = make_eval_step(config, probe_graphdef, extract)
    metrics = evaluate(config, eval_step, params, model_params, num_eval, load_eval, workdir / "pictures")
    rows = run_support.read_jsonl(workdir / LOG_FILE)
    metrics.update(task=config.task, features=config.features.which, feature_source=source,
                   steps=config.train.num_steps, last_loss=rows[-1]["loss"] if rows else None, crop=crop,
                   input_size=input_size)
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    """One line of the headline numbers."""
    keys = ("miou", "pixel_accuracy", "miou_pamr", "pixel_accuracy_pamr", "rmse", "abs_rel", "delta1", "delta2",
            "delta3")
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), float))


__all__ = ["run", "summary", "make_probe", "make_extractor", "make_train_step", "make_eval_step", "evaluate"]
