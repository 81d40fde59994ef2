"""Hugging Face ViT checkpoints (Dinov2, Dinov2WithRegisters, ViT/DINO, ViTMAE) -> `flowfeat_jax.models.vit.ViT`.

`ports.registry.from_pretrained` loads them (and every other registered family); `load_table` is the strict table
loader all families share.

Every tensor goes through one table, `hf_key_table(cfg)`: rows of (NNX path, layout, on-disk torch names,
transformers-5 in-memory torch names). A row with several torch names concatenates them along the torch output axis
(q|k|v into `attn.qkv`, gate|up into `mlp.w12`), so the table also reads in reverse (split along the same axis).
Layouts: Linear (out, in) -> (in, out); Conv OIHW -> HWIO; everything else copied (LayerNorm `weight` -> `scale` is in
the names). Loading collects every missing, unmapped or mis-shaped key and raises once, naming them.
"""

import re
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowfeat_jax.models.vit import ViT, ViTConfig

# Checkpoint keys that belong to heads or pre-training parts the encoder does not have (explicitly not loaded).
_IGNORED_KEYS = re.compile(
    r"^(embeddings\.mask_token|pooler\..*|classifier\..*|decoder\..*|fc_norm\..*|head\..*)$"
)
# Prefixes of task models wrapping the encoder (Dinov2ForImageClassification, ViTMAEForPreTraining, ...).
_WRAPPER_PREFIXES = ("dinov2.", "dinov2_with_registers.", "vit.")
_HF_MODEL_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "vit": "dino", "vit_mae": "mae"}


class KeyRow(NamedTuple):
    nnx_path: str  # dotted path of the NNX variable inside ViT
    layout: str  # 'linear' | 'conv' | 'copy'
    disk_names: tuple[str, ...]  # safetensors / pytorch_model.bin names (save_pretrained writes these)
    memory_names: tuple[str, ...]  # transformers-5 module state_dict names


def _block_rows(cfg: ViTConfig, i: int) -> Iterator[KeyRow]:
    """Rows for block i. DINOv2 names its norms norm1/norm2; ViT and ViTMAE layernorm_before/after."""
    disk = f"encoder.layer.{i}."
    if cfg.family == "dinov2":
        memory = disk
        norm1, norm2 = "norm1", "norm2"
    else:
        memory = f"layers.{i}."
        norm1, norm2 = "layernorm_before", "layernorm_after"
    out = f"blocks.{i}."
    for nnx_norm, torch_norm in (("norm1", norm1), ("norm2", norm2)):
        for nnx_param, param in (("scale", "weight"), ("bias", "bias")):
            yield KeyRow(f"{out}{nnx_norm}.{nnx_param}", "copy", (f"{disk}{torch_norm}.{param}",),
                         (f"{memory}{torch_norm}.{param}",))
    for param, layout in (("weight", "linear"), ("bias", "copy")):
        nnx_param = "kernel" if param == "weight" else "bias"
        if param == "weight" or cfg.qkv_bias:
            yield KeyRow(out + "attn.qkv." + nnx_param, layout,
                         tuple(f"{disk}attention.attention.{n}.{param}" for n in ("query", "key", "value")),
                         tuple(f"{memory}attention.{n}_proj.{param}" for n in "qkv"))
        yield KeyRow(out + "attn.proj." + nnx_param, layout, (f"{disk}attention.output.dense.{param}",),
                     (f"{memory}attention.o_proj.{param}",))
        if cfg.swiglu:  # DINOv2 giant; on disk gate|up is one fused tensor, as in the hub
            yield KeyRow(out + "mlp.w12." + nnx_param, layout, (f"{disk}mlp.weights_in.{param}",),
                         (f"{memory}mlp.gate_proj.{param}", f"{memory}mlp.up_proj.{param}"))
            yield KeyRow(out + "mlp.w3." + nnx_param, layout, (f"{disk}mlp.weights_out.{param}",),
                         (f"{memory}mlp.down_proj.{param}",))
        elif cfg.family == "dinov2":
            for fc in ("fc1", "fc2"):
                yield KeyRow(f"{out}mlp.{fc}.{nnx_param}", layout, (f"{disk}mlp.{fc}.{param}",),
                             (f"{memory}mlp.{fc}.{param}",))
        else:
            yield KeyRow(out + "mlp.fc1." + nnx_param, layout, (f"{disk}intermediate.dense.{param}",),
                         (f"{memory}mlp.fc1.{param}",))
            yield KeyRow(out + "mlp.fc2." + nnx_param, layout, (f"{disk}output.dense.{param}",),
                         (f"{memory}mlp.fc2.{param}",))
    if cfg.layer_scale:
        for k in (1, 2):
            name = f"layer_scale{k}.lambda1"
            yield KeyRow(f"{out}ls{k}.gamma", "copy", (disk + name,), (memory + name,))


def hf_key_table(cfg: ViTConfig) -> list[KeyRow]:
    """The full torch -> NNX table for an HF checkpoint of this config (the only place names are mapped)."""

    def same(nnx_path, layout, name):
        return KeyRow(nnx_path, layout, (name,), (name,))

    rows = [
        same("patch_embed.proj.kernel", "conv", "embeddings.patch_embeddings.projection.weight"),
        same("patch_embed.proj.bias", "copy", "embeddings.patch_embeddings.projection.bias"),
        same("cls_token", "copy", "embeddings.cls_token"),
        same("pos_embed", "copy", "embeddings.position_embeddings"),
    ]
    if cfg.num_registers:
        rows.append(same("register_tokens", "copy", "embeddings.register_tokens"))
    for i in range(cfg.num_layers):
        rows.extend(_block_rows(cfg, i))
    rows += [same("norm.scale", "copy", "layernorm.weight"), same("norm.bias", "copy", "layernorm.bias")]
    return rows


def torch_to_nnx(array: np.ndarray, layout: str) -> np.ndarray:
    """Convert one torch tensor to the NNX layout: Linear (out, in) -> (in, out), Conv OIHW -> HWIO."""
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def vit_config_from_hf(hf_config: Mapping) -> ViTConfig:
    """ViTConfig from an HF config.json dict (model_type dinov2, dinov2_with_registers, vit or vit_mae)."""
    model_type = hf_config.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
        raise ValueError(f"unsupported HF model_type {model_type!r}; expected one of {sorted(_HF_MODEL_TYPES)}")
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported hidden_act {hf_config['hidden_act']!r}; only exact 'gelu' is implemented")
    if hf_config.get("num_channels", 3) != 3:
        raise ValueError(f"unsupported num_channels {hf_config['num_channels']}; expected 3 (RGB)")
    family = _HF_MODEL_TYPES[model_type]
    patch, image = hf_config["patch_size"], hf_config["image_size"]
    if not isinstance(patch, int) or not isinstance(image, int):
        raise ValueError(f"only square int image_size/patch_size are supported, got {image!r}/{patch!r}")
    hidden = hf_config["hidden_size"]
    swiglu = bool(hf_config.get("use_swiglu_ffn", False))
    if family == "dinov2":
        mlp_dim = int(hidden * hf_config.get("mlp_ratio", 4))
        if swiglu:  # transformers Dinov2SwiGLUFFN: two thirds, rounded up to a multiple of 8
            mlp_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
    else:
        mlp_dim = hf_config["intermediate_size"]
    return ViTConfig(
        family=family,
        patch_size=patch,
        hidden_size=hidden,
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        mlp_dim=mlp_dim,
        num_registers=hf_config.get("num_register_tokens", 0) if model_type == "dinov2_with_registers" else 0,
        layer_scale=family == "dinov2",
        swiglu=swiglu,
        qkv_bias=hf_config.get("qkv_bias", True),
        layer_norm_eps=hf_config["layer_norm_eps"],
        pos_grid=image // patch,
        pos_interp="hf",
        pos_antialias=model_type == "dinov2_with_registers",
    )


def _strip_wrapper_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Remove a task-model prefix (`dinov2.`, `vit.`, ...) when the encoder's keys carry it."""
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix + "embeddings.") for k in state):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return dict(state)


def load_hf_state_dict(model: ViT, state: Mapping[str, np.ndarray]) -> None:
    """Fill every parameter of `model` from an HF state dict (numpy arrays), through `hf_key_table` (strict, see
    `load_table`); a task-model prefix (`dinov2.`, `vit.`, ...) is removed first."""
    load_table(model, _strip_wrapper_prefix(state), hf_key_table(model.cfg), ignored=_IGNORED_KEYS, what="ViT")


def load_table(model: nnx.Module, state: Mapping[str, np.ndarray], table: list[KeyRow], *, ignored: re.Pattern,
               what: str) -> None:
    """Fill every parameter of `model` from `state` through `table` (any encoder family's KeyRow table).

    Each row is filled from its on-disk names if all are present, else from its in-memory names. Checkpoint keys
    matching `ignored` may stay unused. Raises one ValueError ("cannot load <what> checkpoint: ...") listing all
    missing keys, unmapped checkpoint keys, shape mismatches and parameters without a row; the model is only updated
    when there are none.
    """
    params = nnx.state(model, nnx.Param)
    flat = {".".join(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(params)}
    used, missing, mismatched, values = set(), [], [], {}
    for row in table:
        if row.nnx_path not in flat:
            mismatched.append(f"table row {row.nnx_path} has no model parameter")
            continue
        names = next((n for n in (row.disk_names, row.memory_names) if all(k in state for k in n)), None)
        if names is None:
            missing.append(" + ".join(k for k in row.disk_names if k not in state)
                           + f" (or {' + '.join(row.memory_names)})")
            continue
        used.update(names)
        tensor = np.concatenate([np.asarray(state[k]) for k in names], axis=0)
        array = torch_to_nnx(tensor, row.layout)
        target = flat[row.nnx_path]
        if array.shape != target.shape:
            mismatched.append(f"{' + '.join(names)} -> {row.nnx_path}: checkpoint {tuple(tensor.shape)} gives "
                              f"{array.shape}, model expects {target.shape}")
            continue
        values[row.nnx_path] = array
    unmapped = sorted(k for k in state if k not in used and not ignored.match(k))
    unfilled = sorted(set(flat) - {row.nnx_path for row in table})
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unmapped:
        problems.append(f"unmapped checkpoint keys: {', '.join(unmapped)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if unfilled:
        problems.append(f"model parameters with no table row: {', '.join(unfilled)}")
    if problems:
        raise ValueError(f"cannot load {what} checkpoint: " + " | ".join(problems))
    for path, array in values.items():
        flat[path].set_value(jnp.asarray(array, dtype=flat[path].dtype))
    nnx.update(model, params)
