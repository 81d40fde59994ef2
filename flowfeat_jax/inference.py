"""Load a trained FlowFeat from a run directory (or one checkpoint step) for evaluation, extraction and export."""

from __future__ import annotations

import pathlib

import flax.nnx as nnx
import jax
import ml_collections

from flowfeat_jax.models.flowfeat import FlowFeat
from flowfeat_jax.train import checkpoint as ckpt_lib
from flowfeat_jax.train import loop


def resolve_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """`path` is a work dir (its latest checkpoint), its `checkpoints/` folder, or one `checkpoints/<step>` folder."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or work dir")
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise FileNotFoundError(f"{path}: holds no finished checkpoint (expected checkpoints/<step>/state)")
    return directory, steps[-1]


def load_flowfeat(
    path: str | pathlib.Path, *, decoder: str = "online"
) -> tuple[FlowFeat, ml_collections.ConfigDict, int]:
    """The FlowFeat of a checkpoint with the online decoder (default: the model the reference validates and releases,
    recipe.md step 12) or the EMA teacher (`decoder="ema"`).

    Returns (model, config the run used, step).
    """
    if decoder not in ("ema", "online"):
        raise ValueError(f"decoder must be 'ema' or 'online', got {decoder!r}")
    directory, step = resolve_checkpoint(path)
    checkpointer = ckpt_lib.Checkpointer(directory)
    meta = checkpointer.restore_meta(step)
    config = ml_collections.ConfigDict(meta["config"])
    encoder_dir = pathlib.Path(config.model.encoder)
    if config.model.encoder and not encoder_dir.exists() and (directory.parent / "encoder").is_dir():
        config.model.encoder = str(directory.parent / "encoder")  # an imported run dir that was moved
    model, source = loop.build_flowfeat(config.model, config.seed, init_decoder=False)
    encoder_params = nnx.to_pure_dict(nnx.state(model.encoder))
    ckpt_lib.check_same_encoder(meta, source, ckpt_lib.tree_digest(encoder_params), directory / str(step))
    decoder_params = nnx.to_pure_dict(nnx.state(model.decoder))  # abstract: shapes only
    tx = loop.make_optimizer(config.train, config.model.random_decoder)
    template = jax.eval_shape(lambda p: loop.init_train_state(p, tx, config.seed), decoder_params)
    state, _ = checkpointer.restore(step, template)
    checkpointer.close()
    nnx.update(model.decoder, state.ema_params if decoder == "ema" else state.params)
    return model, config, step
