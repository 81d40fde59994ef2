"""Released FlowFeat `.pth` state dicts <-> JAX FlowFeat modules (issue 7): key tables, layouts, architectures.

A reference file is the state dict of model.py FlowFeat: `encoder.*` in torch-hub ViT names (DINO, DINOv2, MAE) and
`decoder.*` in reference DecodeDPT names; a training snapshot ({"model": ...} of FlowFeatTrain) also holds the EMA
teacher under `decoder_ema.ema_model.*`.

One table per direction pair: `hub_key_table` (hub name <-> NNX path <-> HF on-disk names, derived row by row from
`ports.vit.hf_key_table`) and `ports.dpt.DPT_KEY_TABLE`. Import reads them forwards (hub -> HF directory for the
encoder, reference -> NNX for the decoder), export backwards (NNX -> hub / reference names).

Export writes the architecture beside the tensors (`torch_ref.flowfeat.architecture_dict`: safetensors metadata, or
`<file>.pth.json`), including the head count, the family and pos_interp, so an import rebuilds the same model; files
without it (released reference checkpoints) are read from their shapes, refusing what the shapes leave open.

Run directories (import of a file into a run, export of a run's checkpoint) are the app layer's:
`apps/torch_files.py`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from flowfeat_jax.models.dpt import DPTConfig
from flowfeat_jax.models.flowfeat import FlowFeat, FlowFeatConfig, default_hooks
from flowfeat_jax.models.vit import ViTConfig
from flowfeat_jax.ports import dpt as dpt_ports
from flowfeat_jax.ports import vit as vit_ports
from flowfeat_jax.torch_ref import flowfeat as torch_flowfeat
from flowfeat_jax.torch_ref.vit import HubViTConfig, mae_sincos_pos_embed

# Training-snapshot keys: the EMA teacher, a second copy of the online decoder, and EMA bookkeeping buffers.
_EMA_PREFIX = "decoder_ema.ema_model."
_EMA_ONLINE_PREFIX = "decoder_ema.online_model."
_EMA_BUFFERS = ("decoder_ema.initted", "decoder_ema.step")
_MASK_TOKEN_HUB, _MASK_TOKEN_HF = "mask_token", "embeddings.mask_token"
# LayerNorm eps of every hub encoder (DINO, DINOv2, reference MAEEncoder).
_HUB_EPS = 1e-6
# MAE's table is fixed sin-cos; a stored table this close to it marks an MAE encoder.
_SINCOS_TOLERANCE = 1e-4


class HubRow(NamedTuple):
    nnx_path: str  # dotted path of the ViT parameter
    layout: str  # 'linear' | 'conv' | 'copy' (ports.vit.torch_to_nnx)
    hub_name: str  # torch-hub / reference encoder key, without `encoder.`
    hf_names: tuple[str, ...]  # HF on-disk keys; several = hub tensor split along axis 0 (q|k|v)


def _hub_name(nnx_path: str) -> str:
    """The hub names the NNX ViT's modules as the hub does; only torch's `weight` differs (NNX kernel/scale)."""
    head, _, leaf = nnx_path.rpartition(".")
    return f"{head}.weight" if leaf in ("kernel", "scale") else nnx_path


def hub_key_table(cfg: ViTConfig) -> list[HubRow]:
    """hub name <-> NNX path <-> HF names for every encoder parameter, one row per `hf_key_table` row."""
    return [HubRow(r.nnx_path, r.layout, _hub_name(r.nnx_path), r.disk_names) for r in vit_ports.hf_key_table(cfg)]


def nnx_to_torch(array: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of `ports.vit.torch_to_nnx`: (in, out) -> Linear (out, in), HWIO -> Conv OIHW."""
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)
    return array


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return nnx_to_torch(np.empty(shape, np.bool_), layout).shape


def _has_mask_token(cfg: ViTConfig) -> bool:
    return cfg.family == "dinov2"  # the hub DinoVisionTransformer always has one


def reference_shapes(cfg: FlowFeatConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the reference FlowFeat state dict for this config, with its torch shape (nothing allocated)."""
    model = nnx.eval_shape(lambda: FlowFeat(cfg, rngs=nnx.Rngs(0)))
    shapes = {}
    encoder = _flat_params(model.encoder)
    for row in hub_key_table(cfg.encoder):
        shapes["encoder." + row.hub_name] = _torch_shape(encoder[row.nnx_path].shape, row.layout)
    if _has_mask_token(cfg.encoder):
        shapes["encoder." + _MASK_TOKEN_HUB] = (1, cfg.encoder.hidden_size)
    decoder = _flat_params(model.decoder)
    for torch_key, nnx_path, is_kernel in dpt_ports.DPT_KEY_TABLE:
        shape = decoder[nnx_path].shape
        shapes["decoder." + torch_key] = _torch_shape(shape, "conv") if is_kernel and len(shape) == 4 else tuple(shape)
    return shapes


def _flat_params(module: nnx.Module) -> dict:
    return {".".join(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# --------------------------------------------------------------------------------------------------------------------
# Export: NNX -> reference names
# --------------------------------------------------------------------------------------------------------------------


def flowfeat_state_dict(model: FlowFeat, mask_token: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The reference FlowFeat state dict (float32 numpy, torch layouts) of a JAX FlowFeat.

    `mask_token` (DINOv2 only; unused at inference) defaults to zeros, the hub's initial value.
    """
    cfg = model.cfg
    if cfg.hooks != default_hooks(cfg.encoder.num_layers):
        raise ValueError(f"hooks {cfg.hooks} differ from the reference hooks {default_hooks(cfg.encoder.num_layers)} "
                         "for this depth; the reference FlowFeat cannot run this model")
    encoder = _flat_params(model.encoder)
    state = {}
    for row in hub_key_table(cfg.encoder):
        value = np.asarray(encoder[row.nnx_path].get_value(), np.float32)
        state["encoder." + row.hub_name] = nnx_to_torch(value, row.layout)
    if _has_mask_token(cfg.encoder):
        token = np.zeros((1, cfg.encoder.hidden_size), np.float32) if mask_token is None else mask_token
        state["encoder." + _MASK_TOKEN_HUB] = np.asarray(token, np.float32)
    for key, value in dpt_ports.dpt_state_dict(model.decoder).items():
        state["decoder." + key] = np.asarray(value, np.float32)
    check_against_reference(state, reference_shapes(cfg), "exported state dict")
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def stored_mask_token(encoder: str) -> np.ndarray | None:
    """The DINOv2 mask token of a local HF encoder directory (kept there by the import), else None."""
    weights = pathlib.Path(encoder) / "model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(weights, "np") as f:
        return f.get_tensor(_MASK_TOKEN_HF) if _MASK_TOKEN_HF in f.keys() else None


def export_architecture(cfg: FlowFeatConfig) -> dict:
    """The architecture record of an export (`torch_ref.flowfeat.architecture_dict`) for a JAX FlowFeat config."""
    enc = cfg.encoder
    hub = HubViTConfig(patch_size=enc.patch_size, hidden_size=enc.hidden_size, num_layers=enc.num_layers,
                       num_heads=enc.num_heads, mlp_dim=enc.mlp_dim, num_registers=enc.num_registers,
                       layer_scale=enc.layer_scale, swiglu=enc.swiglu, qkv_bias=enc.qkv_bias,
                       mask_token=_has_mask_token(enc), pos_grid=enc.pos_grid, pos_antialias=enc.pos_antialias,
                       layer_norm_eps=enc.layer_norm_eps)
    torch_cfg = torch_flowfeat.TorchFlowFeatConfig(hub, tuple(cfg.decoder.widths), cfg.decoder.features, cfg.hooks)
    return torch_flowfeat.architecture_dict(torch_cfg, family=enc.family, pos_interp=enc.pos_interp)


def export_notes(enc: ViTConfig) -> list[str]:
    """Where a torch (hub) model loaded from an export of this encoder computes other outputs than the JAX one."""
    notes = []
    if enc.pos_interp != "hub":
        # Both resizings leave the table as stored at its own square grid, and only there do they agree.
        side = enc.pos_grid * enc.patch_size
        where = (f"only at {side}x{side} px inputs (the stored {enc.pos_grid}x{enc.pos_grid} token grid)"
                 if enc.pos_grid % 2 == 0 else
                 f"at no decoder input size: only {side}x{side} px keeps the stored {enc.pos_grid}x{enc.pos_grid} "
                 "token grid, and the decoder needs an even grid (the encoder features alone match there)")
        notes.append(f"the run resizes position tables with pos_interp={enc.pos_interp!r}, torch (hub) differently; "
                     f"FlowFeat outputs match exactly {where}")
    if enc.layer_norm_eps != _HUB_EPS:
        notes.append(f"the encoder LayerNorm eps is {enc.layer_norm_eps:g}, the hub model uses {_HUB_EPS:g}")
    return notes


# --------------------------------------------------------------------------------------------------------------------
# Import: reference file -> run directory
# --------------------------------------------------------------------------------------------------------------------


def read_reference_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The float32 numpy state dict of a released .pth / .safetensors (a {"model": ...} training snapshot unwrapped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return {k: v.astype(np.float32) for k, v in load_file(path).items()}
    import torch  # heavy, and only for .pth files

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text for it is many lines with terminal colour codes
        raise ValueError(f"{path}: holds pickled Python objects (a whole nn.Module?), not a state dict of tensors; "
                         "save model.state_dict() instead") from None
    except Exception as error:  # not a torch file
        raise ValueError(f"{path}: cannot read as a torch state dict ({type(error).__name__}: {error})") from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or {{'model': state dict}})")
    return {k: v.detach().float().numpy() for k, v in state.items()}


def split_reference_state_dict(state: Mapping[str, np.ndarray]) -> tuple[dict, dict, dict | None]:
    """(`encoder.*`, `decoder.*`, EMA teacher `decoder_ema.ema_model.*` or None), prefixes kept on the first two."""
    encoder, decoder, ema, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith("encoder."):
            encoder[key] = value
        elif key.startswith("decoder."):
            decoder[key] = value
        elif key.startswith(_EMA_PREFIX):
            ema["decoder." + key[len(_EMA_PREFIX):]] = value
        elif not key.startswith(_EMA_ONLINE_PREFIX) and key not in _EMA_BUFFERS:  # online copy == decoder.*
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys (not encoder./decoder./decoder_ema.): {', '.join(sorted(unknown))}")
    return encoder, decoder, ema or None


def check_against_reference(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str) -> None:
    """One ValueError naming every missing, unexpected and mis-shaped key."""
    problems = [f"missing key {k}" for k in sorted(set(expected) - set(state))]
    problems += [f"unexpected key {k}" for k in sorted(set(state) - set(expected))]
    problems += [f"{k} has shape {tuple(state[k].shape)}, expected {expected[k]}"
                 for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k])]
    if problems:
        raise ValueError(f"{what} does not match the reference FlowFeat layout: " + "; ".join(problems))


def _is_mae_table(pos_embed: np.ndarray) -> bool:
    """True when the stored table is MAE's fixed sin-cos table (zero class row, 2-D sin-cos patch rows)."""
    _, rows, dim = pos_embed.shape
    side = int(round((rows - 1) ** 0.5))
    if dim % 4 or side * side != rows - 1:
        return False
    return bool(np.abs(pos_embed - mae_sincos_pos_embed(dim, side)).max() < _SINCOS_TOLERANCE)


def vit_config_from_hub(hub: HubViTConfig, family: str, pos_interp: str = "hub") -> ViTConfig:
    """The JAX encoder config of a hub ViT (hub position resizing unless the file recorded another mode)."""
    return ViTConfig(family=family, patch_size=hub.patch_size, hidden_size=hub.hidden_size, num_layers=hub.num_layers,
                     num_heads=hub.num_heads, mlp_dim=hub.mlp_dim, num_registers=hub.num_registers,
                     layer_scale=hub.layer_scale, swiglu=hub.swiglu, qkv_bias=hub.qkv_bias,
                     layer_norm_eps=hub.layer_norm_eps, pos_grid=hub.pos_grid, pos_interp=pos_interp,
                     pos_antialias=hub.pos_antialias)


def infer_flowfeat_config(state: Mapping[str, np.ndarray], *, family: str | None = None,
                          num_heads: int | None = None, architecture: Mapping | None = None) -> FlowFeatConfig:
    """FlowFeatConfig of a reference state dict: the `architecture` its file carries (exports of this project; a
    given `family` / `num_heads` must agree with it), else from its shapes (torch_ref.flowfeat.infer_config) plus
    the family: DINOv2 by its mask token / layer scale, MAE by its sin-cos position table, else DINO; `family`
    decides between DINO and MAE when given (and must agree with DINOv2-ness)."""
    if architecture is not None:
        recorded = torch_flowfeat.config_from_architecture(architecture, "the file's architecture")
        given = {"family": (family, architecture["family"]), "num_heads": (num_heads, recorded.encoder.num_heads)}
        for name, (value, stored) in given.items():
            if value is not None and value != stored:
                raise ValueError(f"the file records {name} {stored!r}, but {value!r} was given")
        vit_cfg = vit_config_from_hub(recorded.encoder, architecture["family"], architecture["pos_interp"])
        decoder = DPTConfig(vit_dim=vit_cfg.hidden_size, widths=recorded.widths, features=recorded.features,
                            patch_size=vit_cfg.patch_size)
        return FlowFeatConfig(encoder=vit_cfg, decoder=decoder, hooks=recorded.hooks)
    inferred = torch_flowfeat.infer_config({k: v.shape for k, v in state.items()}, num_heads)
    hub = inferred.encoder
    is_dinov2 = hub.mask_token or hub.layer_scale
    if family is None:
        family = "dinov2" if is_dinov2 else "mae" if _is_mae_table(state["encoder.pos_embed"]) else "dino"
    elif (family == "dinov2") != is_dinov2:
        raise ValueError(f"the config names a {family} encoder, but the file's encoder "
                         f"{'has' if is_dinov2 else 'lacks'} the DINOv2 mask token / layer scale")
    vit_cfg = vit_config_from_hub(hub, family)
    decoder = DPTConfig(vit_dim=hub.hidden_size, widths=inferred.widths, features=inferred.features,
                        patch_size=hub.patch_size)
    return FlowFeatConfig(encoder=vit_cfg, decoder=decoder, hooks=inferred.hooks)


def hf_config_dict(cfg: ViTConfig) -> dict:
    """config.json of the HF model (Dinov2Model, Dinov2WithRegistersModel, ViTModel, ViTMAEModel) holding this
    encoder; `ports.vit.vit_config_from_hf` reads it back to `cfg` (checked here)."""
    d = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps, image_size=cfg.pos_grid * cfg.patch_size,
             patch_size=cfg.patch_size, num_channels=3, qkv_bias=cfg.qkv_bias, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, initializer_range=0.02)
    if cfg.family == "dinov2":
        # transformers sizes the MLP as int(hidden * mlp_ratio), SwiGLU as two thirds of that rounded up to 8; its
        # config class types mlp_ratio as int (a fractional ratio is only readable by ports.vit).
        ratio = 4 if cfg.swiglu else cfg.mlp_dim / cfg.hidden_size
        ratio = int(ratio) if float(ratio).is_integer() else ratio
        model_type = "dinov2_with_registers" if cfg.num_registers else "dinov2"
        d.update(model_type=model_type, mlp_ratio=ratio, layerscale_value=1.0, drop_path_rate=0.0,
                 use_swiglu_ffn=cfg.swiglu, use_mask_token=True)
        if cfg.num_registers:
            d["num_register_tokens"] = cfg.num_registers
        d["architectures"] = ["Dinov2WithRegistersModel" if cfg.num_registers else "Dinov2Model"]
    else:
        d.update(model_type="vit" if cfg.family == "dino" else "vit_mae", intermediate_size=cfg.mlp_dim,
                 architectures=["ViTModel" if cfg.family == "dino" else "ViTMAEModel"])
        if cfg.family == "dino":
            d["encoder_stride"] = cfg.patch_size
    back = dataclasses.replace(vit_ports.vit_config_from_hf(d), pos_interp=cfg.pos_interp, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype)
    if back != cfg:
        raise ValueError(f"this encoder has no exact HF config: {cfg} would load as {back}")
    return d


def write_hf_encoder(directory: pathlib.Path, encoder_state: Mapping[str, np.ndarray], cfg: ViTConfig) -> None:
    """An HF-format copy of a hub encoder (`encoder.*` keys): config.json + model.safetensors in HF on-disk names."""
    tensors = {}
    for row in hub_key_table(cfg):
        parts = np.split(encoder_state["encoder." + row.hub_name], len(row.hf_names), axis=0)  # q|k|v
        tensors.update(zip(row.hf_names, parts))
    if _has_mask_token(cfg):
        tensors[_MASK_TOKEN_HF] = encoder_state["encoder." + _MASK_TOKEN_HUB]
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
