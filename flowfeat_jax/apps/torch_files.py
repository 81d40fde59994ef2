"""Released FlowFeat `.pth` / `.safetensors` files <-> run directories (tools/import_torch.py, export_torch.py).

The tensor layouts, key tables and architecture records are `ports.flowfeat`'s; this module reads and writes the run
side. Import writes a run directory that `main` (fine-tuning), `inference.load_flowfeat`, evaluation and
tools/extract_features.py read: config.json, checkpoints/0/{state,meta} and encoder/ (an HF-format copy of the
encoder: config.json + model.safetensors), with config.model.encoder = that directory and pos_interp = the file's
('hub' for a released file). Export writes a run's checkpoint in the reference layout with its architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.torch
import torch
from flax import nnx

from flowfeat_jax import config as config_lib
from flowfeat_jax import inference
from flowfeat_jax.models.dpt import DPT
from flowfeat_jax.models.flowfeat import FlowFeatConfig
from flowfeat_jax.models.vit import ViTConfig
from flowfeat_jax.ports import build, registry
from flowfeat_jax.ports import dpt as dpt_ports
from flowfeat_jax.ports import flowfeat as flowfeat_ports
from flowfeat_jax.torch_ref import flowfeat as torch_flowfeat
from flowfeat_jax.train import checkpoint as ckpt_lib
from flowfeat_jax.train import loop


def check_export_path(out: pathlib.Path, use_safetensors: bool, overwrite: bool) -> None:
    """Refuses, before any work, an output that is a folder, an existing file (unless `overwrite`), in a missing
    folder, or whose suffix contradicts the format (a .pth written as safetensors, or the reverse)."""
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; give the output file, e.g. {out / 'flowfeat.pth'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    if not out.absolute().parent.is_dir():
        raise FileNotFoundError(f"output folder of {out} does not exist")
    if use_safetensors != (out.suffix == ".safetensors"):
        wanted = ".safetensors (with --safetensors)" if use_safetensors else ".pth (or --safetensors for .safetensors)"
        raise ValueError(f"{out}: the file name must end in {wanted}")


def export_flowfeat(checkpoint: str | pathlib.Path, out: str | pathlib.Path, *, decoder: str = "online",
                    use_safetensors: bool = False, overwrite: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """Writes the reference state dict of a run directory / checkpoint to `out` (.pth, or .safetensors), with its
    architecture (safetensors metadata, or `<out>.json` beside a .pth; `torch_ref.flowfeat.read_architecture`).

    Returns the state dict and notes on where torch outputs will differ (position resizing, LayerNorm eps).
    """
    out = pathlib.Path(out)
    check_export_path(out, use_safetensors, overwrite)
    model, config, _ = inference.load_flowfeat(checkpoint, decoder=decoder)
    state = flowfeat_ports.flowfeat_state_dict(model, flowfeat_ports.stored_mask_token(config.model.encoder))
    architecture = json.dumps(flowfeat_ports.export_architecture(model.cfg))
    notes = flowfeat_ports.export_notes(model.cfg.encoder)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}  # writable copies
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: never a half-written `out`
    sidecar = torch_flowfeat.architecture_path(out)
    sidecar_tmp = sidecar.with_name(f".{sidecar.name}.tmp")
    try:
        if use_safetensors:
            metadata = {"format": "pt", torch_flowfeat.ARCHITECTURE_KEY: architecture}
            safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        else:
            torch.save(tensors, tmp)
            sidecar_tmp.write_text(architecture + "\n")
            os.replace(sidecar_tmp, sidecar)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        sidecar_tmp.unlink(missing_ok=True)
    return state, notes


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _config_for_import(config: ml_collections.ConfigDict | None, cfg: FlowFeatConfig) -> ml_collections.ConfigDict:
    """The run config: `config` (or the base config) with encoder, pos_interp and features of the file; a given
    config's encoder sizes must match the file."""
    enc = cfg.encoder
    if config is None:
        config = config_lib.base_config()
        for name in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dino_vits16", "dino_vitb16",
                     "mae_vitb16", "mae_vitl16"):
            preset = getattr(ViTConfig, name)()
            same = ("family", "patch_size", "hidden_size", "num_layers")
            if all(getattr(preset, f) == getattr(enc, f) for f in same):
                config.model.encoder_arch = name
    else:
        config = ml_collections.ConfigDict(config.to_dict())
        named = build.encoder_config(config.model)
        fields = ("family", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")
        differ = [f"{f} {getattr(named, f)} (file: {getattr(enc, f)})" for f in fields
                  if getattr(named, f) != getattr(enc, f)]
        if differ:
            raise ValueError(f"the config's encoder ({config.model.encoder_arch}) does not match the file: "
                             + ", ".join(differ))
    config.model.features = cfg.decoder.features
    config.model.hooks = ()
    config.model.pos_interp = enc.pos_interp
    return config


def _make_readable(root: pathlib.Path) -> None:
    """Give the mkdtemp directory (0700) and the files in it the permissions of newly created ones (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def import_flowfeat(pth: str | pathlib.Path, out_dir: str | pathlib.Path,
                    config: ml_collections.ConfigDict | None = None, *, num_heads: int | None = None,
                    family: str | None = None) -> pathlib.Path:
    """Converts a FlowFeat file into a run directory `out_dir` (must not exist); returns its absolute path.

    The architecture comes from the file when it carries one (exports of this project), else from its shapes:
    `num_heads` (or the config's) is needed for widths other than the released ones, and `family` (or the config's)
    decides DINO vs MAE where the weights do not. `config` (an experiment config, e.g. configs/<name>.py) supplies
    the training settings for fine-tuning; without it the base config is used. Raises ValueError naming every
    missing, unexpected or mis-shaped key; nothing is written then.
    """
    pth, out_dir = pathlib.Path(pth), pathlib.Path(out_dir).absolute()
    if num_heads is not None and num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new output directory")
    if not out_dir.parent.is_dir():
        raise FileNotFoundError(f"output folder {out_dir.parent} does not exist")
    state = flowfeat_ports.read_reference_file(pth)
    architecture = torch_flowfeat.read_architecture(pth)
    encoder_state, decoder_state, ema_state = flowfeat_ports.split_reference_state_dict(state)
    if config is not None and architecture is None:
        named = build.encoder_config(config.model)
        family, num_heads = family or named.family, num_heads or named.num_heads
    try:
        cfg = flowfeat_ports.infer_flowfeat_config({**encoder_state, **decoder_state}, family=family,
                                                   num_heads=num_heads, architecture=architecture)
    except ValueError as error:
        raise ValueError(f"{pth}: {error}") from None
    expected = flowfeat_ports.reference_shapes(cfg)
    flowfeat_ports.check_against_reference({**encoder_state, **decoder_state}, expected, str(pth))
    if ema_state is not None:
        decoder_shapes = {k: v for k, v in expected.items() if k.startswith("decoder.")}
        flowfeat_ports.check_against_reference(ema_state, decoder_shapes, f"{pth} (decoder_ema.ema_model)")
    config = _config_for_import(config, cfg)
    final_encoder = out_dir / "encoder"

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        flowfeat_ports.write_hf_encoder(tmp / "encoder", encoder_state, cfg.encoder)
        # What build.build_flowfeat builds from this config, without its random init (the weights replace it).
        dtype = jnp.dtype(config.model.dtype)
        encoder = registry.from_pretrained(str(tmp / "encoder"), dtype=dtype, pos_interp=cfg.encoder.pos_interp)
        built = FlowFeatConfig.from_encoder(encoder.cfg, features=config.model.features)
        if built.decoder.widths != cfg.decoder.widths:
            raise ValueError(f"{pth}: decoder widths {cfg.decoder.widths} differ from {built.decoder.widths}, "
                             f"the ones this project builds for a {cfg.encoder.family} encoder")
        config.model.encoder = str(final_encoder)
        decoder = nnx.eval_shape(lambda: DPT(built.decoder, rngs=nnx.Rngs(0)))

        def decoder_params(prefixed):
            dpt_ports.load_dpt_state_dict(decoder, {k[len("decoder."):]: v for k, v in prefixed.items()})
            return jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(decoder)))

        ema = decoder_params(ema_state) if ema_state is not None else None
        online = decoder_params(decoder_state)
        tx = loop.make_optimizer(config.train, config.model.random_decoder)
        train_state = loop.init_train_state(online, tx, config.seed)
        if ema is not None:
            train_state = train_state.replace(ema_params=ema)
        encoder_digest = ckpt_lib.tree_digest(nnx.to_pure_dict(nnx.state(encoder)))
        meta = {
            "config": json.loads(config.to_json_best_effort()),
            "encoder": {"source": str(final_encoder), "digest": encoder_digest},
            "model": {"flowfeat": repr(built)},
            "imported": {"file": str(pth.absolute()), "sha256": _file_sha256(pth), "ema": ema is not None},
        }
        checkpointer = ckpt_lib.Checkpointer(tmp / "checkpoints")
        checkpointer.save(0, train_state, meta)
        checkpointer.close()
        (tmp / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        _make_readable(tmp)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
