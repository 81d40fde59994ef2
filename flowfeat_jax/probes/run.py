"""Train and evaluate a dense probe on frozen features from one experiment config (configs/probe_*.py).

`run(config, workdir)` builds the frozen feature model (a trained FlowFeat run dir, or `config.model`: an encoder by
HF name / local dir, or a random architecture for smoke runs), trains the probe with the paper's Adam (L2 weight
decay, constant lr),
checkpoints it with orbax (resuming from `workdir/checkpoints`), evaluates, and writes `metrics.json` and prediction
pictures under `workdir/pictures/`. Features are computed on the fly inside the jitted step (no gradient reaches
the feature model).
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

from flowfeat_jax import errors, inference
from flowfeat_jax.models.vit import normalize_images
from flowfeat_jax.ports import build
from flowfeat_jax.probes import data as data_lib
from flowfeat_jax.probes import depth as depth_lib
from flowfeat_jax.probes import pamr as pamr_lib
from flowfeat_jax.probes import segmentation as seg_lib
from flowfeat_jax.progress import progress
from flowfeat_jax.train import checkpoint as ckpt_lib
from flowfeat_jax.viz import save_png

FEATURE_CHOICES = ("encoder", "flowfeat", "both")


def build_feature_model(config: ml_collections.ConfigDict):
    """The frozen FlowFeat of `features.run_dir`, else one built from `config.model`; returns (model, source)."""
    if config.features.run_dir:
        model, _, step = inference.load_flowfeat(config.features.run_dir, decoder=config.features.decoder)
        return model, f"{config.features.run_dir}@{step}:{config.features.decoder}"
    model, source = build.build_flowfeat(config.model, config.seed)
    if config.features.which != "encoder" or (config.task == "segmentation" and config.pamr.enabled):
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
    rngs = nnx.Rngs(config.seed)
    p = config.probe
    if config.task == "segmentation":
        cfg = seg_lib.SegmentationProbeConfig(num_classes=config.data.num_classes, num_heads=p.num_heads,
                                              with_norm=p.with_norm, downscale=p.downscale, **widths)
        return seg_lib.SegmentationProbe(cfg, rngs=rngs)
    if config.task == "depth":
        cfg = depth_lib.DepthProbeConfig(num_bins=p.num_bins, num_queries=p.num_queries, embed_dim=p.embed_dim,
                                         num_heads=p.num_heads, token_stride=p.token_stride, min_depth=p.min_depth,
                                         max_depth=p.max_depth, **widths)
        return depth_lib.DepthProbe(cfg, rngs=rngs)
    raise ValueError(f"config.task must be 'segmentation' or 'depth', got {config.task!r}")


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


# --- data ---------------------------------------------------------------------------------------------------------
def make_source(config: ml_collections.ConfigDict, split: str, crop: int, input_size: int):
    """(number of items, load(i) -> dict of arrays) for a split of the configured dataset, at the `input_sizes`."""
    d = config.data
    if config.task == "segmentation":
        if not d.root:
            raise ValueError("config.data.root is empty: point it at the COCO-Stuff folder (see probes/data.py)")
        image_list = d.train_list if split == d.train_split else d.eval_list
        source = data_lib.CocoStuffFolder(d.root, split, image_list or None)
        return len(source), lambda i: source.load(i, input_size, crop)
    if d.source == "tfds":
        source = data_lib.NyuTfds(split, d.tfds_data_dir or None)
    elif d.source == "folder":
        if not d.root:
            raise ValueError("config.data.root is empty: point it at the NYUv2 folder (see probes/data.py)")
        source = data_lib.NyuFolder(d.root, split)
    else:
        raise ValueError(f"config.data.source must be 'folder' or 'tfds', got {d.source!r}")

    def load(i):
        image, depth = source.load(i)
        return data_lib.nyu_sample(image, depth, crop, input_size, source=f"{split}[{i}]")

    return len(source), load


# --- steps --------------------------------------------------------------------------------------------------------
def make_loss(config: ml_collections.ConfigDict) -> Callable:
    """loss(probe, encoder, flowfeat, batch) -> scalar for the configured task."""
    if config.task == "segmentation":

        def seg_loss(probe, encoder, flowfeat, batch):
            logits = probe(encoder, flowfeat, batch["labels"].shape[1:3])
            return seg_lib.cross_entropy_ignore(logits, batch["labels"])

        return seg_loss
    p, weights = config.probe, config.loss

    def depth_loss(probe, encoder, flowfeat, batch):
        target = batch["depth"]
        pred, _ = probe(encoder, flowfeat, target.shape[1:3])
        valid = depth_lib.valid_depth(target, p.min_depth, p.max_depth)
        return (weights.silog_weight * depth_lib.silog_loss(pred, target, valid)
                + weights.grad_weight * depth_lib.gradient_loss(pred, target, valid))

    return depth_loss


def make_train_step(probe_graphdef, extract: Callable, loss: Callable, tx: optax.GradientTransformation):
    """Jitted (params, opt_state, model_params, batch) -> (params, opt_state, loss); params and opt_state donated."""

    def step(params, opt_state, model_params, batch):
        encoder, flowfeat = jax.lax.stop_gradient(extract(model_params, batch["image"]))

        def objective(p):
            return loss(nnx.merge(probe_graphdef, p), encoder, flowfeat, batch)

        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(config: ml_collections.ConfigDict, probe_graphdef, extract: Callable):
    """Jitted (params, model_params, batch) -> dict of predictions (and confusion matrices for segmentation)."""
    num_classes = config.data.num_classes

    def segment(params, model_params, batch):
        encoder, flowfeat = extract(model_params, batch["image"])
        labels = batch["labels"]
        logits = nnx.merge(probe_graphdef, params)(encoder, flowfeat, labels.shape[1:3])
        pred = jnp.argmax(logits, axis=-1)
        out = {"pred": pred, "confusion": seg_lib.confusion_matrix(pred, labels, num_classes)}
        if config.pamr.enabled:
            c = config.pamr
            probs = pamr_lib.pamr(flowfeat, jax.nn.softmax(logits, axis=-1), kernel=c.kernel, size=c.size,
                                  dilations=tuple(c.dilations), num_iter=c.num_iter, scale=c.scale)
            out["pred_pamr"] = jnp.argmax(seg_lib.resize_bilinear(probs, labels.shape[1:3]), axis=-1)
            out["confusion_pamr"] = seg_lib.confusion_matrix(out["pred_pamr"], labels, num_classes)
        return out

    def estimate(params, model_params, batch):
        encoder, flowfeat = extract(model_params, batch["image"])
        pred, _ = nnx.merge(probe_graphdef, params)(encoder, flowfeat, batch["depth"].shape[1:3])
        return {"pred": pred}

    return jax.jit(segment if config.task == "segmentation" else estimate)


# --- evaluation ---------------------------------------------------------------------------------------------------
def evaluate(config, eval_step, params, model_params, num_items, load, pictures_dir: pathlib.Path) -> dict[str, Any]:
    """Runs the eval split; returns the metrics and writes `eval.num_pictures` prediction pictures."""
    limit = min(num_items, config.eval.max_images) if config.eval.max_images else num_items
    batches = data_lib.batches(load, limit, config.eval.batch_size, num_workers=config.data.num_workers)
    num_classes = config.data.num_classes
    confusion = {k: np.zeros((num_classes, num_classes), np.int64) for k in ("", "_pamr")}
    per_image, skipped, pictures = [], 0, 0
    for batch in progress(batches, total=-(-limit // config.eval.batch_size), desc="eval", unit="batch"):
        out = jax.device_get(eval_step(params, model_params, {k: v for k, v in batch.items() if k != "index"}))
        if config.task == "segmentation":
            confusion[""] += out["confusion"]
            if "confusion_pamr" in out:
                confusion["_pamr"] += out["confusion_pamr"]
        else:
            for pred, gt, eigen in zip(out["pred"], batch["depth"], batch["eigen"]):
                errors = depth_lib.image_depth_errors(pred, gt, eigen, min_depth=config.eval.min_depth,
                                                      max_depth=config.eval.max_depth)
                skipped += errors is None
                if errors is not None:
                    per_image.append(errors)
        for b in range(len(batch["index"])):
            if pictures >= config.eval.num_pictures:
                break
            save_png(pictures_dir / f"{pictures:03d}_{int(batch['index'][b])}.png", _picture(config, batch, out, b))
            pictures += 1
    if config.task == "segmentation":
        metrics = {"num_images": limit, **{f"{k}{suffix}": v for suffix, c in confusion.items() if c.sum()
                                           for k, v in seg_lib.segmentation_scores(c).items()}}
        metrics["classes"] = list(data_lib.COARSE_CLASSES) if num_classes == data_lib.NUM_COARSE_CLASSES else None
        return metrics
    if not per_image:
        raise ValueError("no evaluation image has valid ground-truth depth")
    means = {k: float(np.mean([e[k] for e in per_image])) for k in per_image[0]}
    return {"num_images": len(per_image), "invalid_images": skipped, **means}


def _picture(config, batch, out, b) -> np.ndarray:
    """Input | ground truth | prediction (| prediction + PAMR), side by side at the ground-truth size."""
    if config.task == "segmentation":
        k = config.data.num_classes
        panels = [batch["image"][b], seg_lib.colorize_labels(batch["labels"][b], k),
                  seg_lib.colorize_labels(out["pred"][b], k)]
        if "pred_pamr" in out:
            panels.append(seg_lib.colorize_labels(out["pred_pamr"][b], k))
    else:
        gt = batch["depth"][b]
        image = np.asarray(jax.image.resize(batch["image"][b].astype(np.float32), (*gt.shape, 3), "linear"))
        invalid = ~(gt > config.eval.min_depth)
        panels = [np.clip(image, 0, 255).astype(np.uint8), depth_lib.colorize_depth(gt, config.eval.max_depth, invalid),
                  depth_lib.colorize_depth(out["pred"][b], config.eval.max_depth)]
    return np.concatenate(panels, axis=1)


# --- driver -------------------------------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Train (or resume) the probe to `train.num_steps`, evaluate, write metrics.json; returns the metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    logging.info("config:\n%s", config)
    if config.task == "segmentation" and config.pamr.enabled:
        pamr_lib.kernel_offsets(config.pamr.kernel, config.pamr.size, config.pamr.dilations)  # before any work
    tx = make_optimizer(config.train)

    model, source = build_feature_model(config)
    crop, input_size = input_sizes(config.data, model.cfg.encoder.patch_size)
    use_encoder = config.features.which in ("encoder", "both")
    use_flowfeat = config.features.which != "encoder" or (config.task == "segmentation" and config.pamr.enabled)
    model_graphdef, model_state = nnx.split(model)
    model_params = nnx.to_pure_dict(model_state)
    extract = make_extractor(model_graphdef, use_encoder, use_flowfeat)

    probe = make_probe(config, model)
    probe_graphdef, probe_state = nnx.split(probe)
    params = nnx.to_pure_dict(probe_state)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    meta = {"config": json.loads(config.to_json_best_effort()), "features": source, "probe": repr(probe.cfg)}

    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    start = checkpointer.latest_step()
    if start is not None:
        state, _ = checkpointer.restore(start, ckpt_lib.abstract_like(state))
        logging.info("resumed probe from %s at step %d", checkpointer.directory, start)
    start = int(state["step"])

    train_step = make_train_step(probe_graphdef, extract, make_loss(config), tx)
    num_train, load_train = make_source(config, config.data.train_split, crop, input_size)
    stream = data_lib.batches(load_train, num_train, config.train.batch_size, seed=config.seed, start_batch=start,
                              num_workers=config.data.num_workers)
    params, opt_state = state["params"], state["opt_state"]
    bar = progress(range(start, config.train.num_steps), initial=start, total=config.train.num_steps, desc="probe",
                   unit="step")
    tick, tick_step = time.perf_counter(), start
    for step in bar:
        batch = {k: v for k, v in next(stream).items() if k != "index"}
        params, opt_state, loss = train_step(params, opt_state, model_params, batch)
        done = step + 1
        if done % config.train.log_every == 0 or done == config.train.num_steps:
            loss = float(loss)
            if not np.isfinite(loss):
                checkpointer.close()
                raise errors.UserError(f"probe loss is {loss} at step {done}; lower train.lr")
            now = time.perf_counter()
            record = {"step": done, "loss": loss,
                      "img_per_s": config.train.batch_size * (done - tick_step) / max(now - tick, 1e-9)}
            tick, tick_step = now, done
            with (workdir / "train_log.jsonl").open("a") as log:
                log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['img_per_s']:.1f}")
        if done % config.train.checkpoint_every == 0 or done == config.train.num_steps:
            state = {"step": jnp.asarray(done, jnp.int32), "params": params, "opt_state": opt_state}
            checkpointer.save(done, state, meta)
    checkpointer.close()

    num_eval, load_eval = make_source(config, config.data.eval_split, crop, input_size)
    eval_step = make_eval_step(config, probe_graphdef, extract)
    metrics = evaluate(config, eval_step, params, model_params, num_eval, load_eval, workdir / "pictures")
    metrics.update(task=config.task, features=config.features.which, feature_source=source,
                   steps=config.train.num_steps, last_loss=_last_loss(workdir), crop=crop, input_size=input_size)
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _last_loss(workdir: pathlib.Path) -> float | None:
    log = workdir / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return json.loads(lines[-1])["loss"] if lines else None


def summary(metrics: dict[str, Any]) -> str:
    """One line of the headline numbers."""
    keys = ("miou", "pixel_accuracy", "miou_pamr", "pixel_accuracy_pamr", "rmse", "abs_rel", "delta1", "delta2",
            "delta3")
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), float))


__all__ = ["run", "summary", "make_probe", "make_extractor", "make_train_step", "make_eval_step", "evaluate"]
