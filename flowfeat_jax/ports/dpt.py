"""Torch ↔ NNX weights of the DPT decoder: one key table, read forwards by the loader and backwards by the exporter.

Torch names are those of the reference DecodeDPT (model.py, util/dpt_blocks.py) without the `decoder.` prefix of a
FlowFeat checkpoint. Layouts: Conv2d (O, I, kh, kw) → (kh, kw, I, O); ConvTranspose2d (I, O, kh, kw) →
(kh, kw, O, I) for models.dpt.PatchUpsample (the layout of nnx.ConvTranspose(transpose_kernel=True)); both are the
permutation (2, 3, 1, 0).
LayerNorm `weight` → `scale`.
"""

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowfeat_jax.models.dpt import DPT

# Torch 4-D weight (conv OIHW or conv-transpose IOHW) → NNX kernel; the inverse for the export.
_KERNEL_TO_NNX = (2, 3, 1, 0)
_KERNEL_TO_TORCH = tuple(int(i) for i in np.argsort(_KERNEL_TO_NNX))


def _conv_rows(torch_name: str, nnx_path: str, bias: bool = True) -> list[tuple[str, str, bool]]:
    rows = [(f"{torch_name}.weight", f"{nnx_path}.kernel", True)]
    if bias:
        rows.append((f"{torch_name}.bias", f"{nnx_path}.bias", False))
    return rows


def _key_table() -> tuple[tuple[str, str, bool], ...]:
    """(torch key, NNX path, is a 4-D kernel) for every decoder parameter."""
    rows = []
    for k in (1, 2, 3, 4):
        rows += _conv_rows(f"act_postprocess{k}.post.0", f"act_postprocess{k}.project")
        if k != 3:  # postprocess3 is the ×1 path: projection only
            rows += _conv_rows(f"act_postprocess{k}.post.1", f"act_postprocess{k}.resample")
    for k in (1, 2, 3, 4):
        rows += _conv_rows(f"scratch.layer{k}_rn", f"layer{k}_rn", bias=False)
    for k in (1, 2, 3, 4):
        for unit in (1, 2):
            for conv in (1, 2):
                rows += _conv_rows(
                    f"scratch.refinenet{k}.resConfUnit{unit}.conv{conv}", f"refinenet{k}.residual_unit{unit}.conv{conv}"
                )
    rows += _conv_rows("scratch.output_conv0", "output_conv0")
    rows += _conv_rows("scratch.output_conv1.0", "output_conv1a")
    rows += _conv_rows("scratch.output_conv1.2", "output_conv1b")
    rows += [("norm.norm.weight", "norm.scale", False), ("norm.norm.bias", "norm.bias", False)]
    return tuple(rows)


DPT_KEY_TABLE = _key_table()


def _param(decoder: DPT, nnx_path: str) -> nnx.Param:
    node = decoder
    for name in nnx_path.split("."):
        node = getattr(node, name)
    return node


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor; float() also covers bf16, which numpy lacks
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def load_dpt_state_dict(decoder: DPT, state_dict: Mapping[str, object]) -> DPT:
    """Copies a reference DecodeDPT state dict (torch tensors or arrays) into `decoder` in place and returns it.

    `decoder` may be abstract, `nnx.eval_shape(lambda: DPT(cfg, rngs=nnx.Rngs(0)))`, which skips the random init.

    Strict: a torch key without a table row, a table row without a torch key, a shape mismatch, or an NNX parameter
    outside the table is an error; all of them are collected into one ValueError.
    """
    table_paths = {path for _, path, _ in DPT_KEY_TABLE}
    nnx_paths = {".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(decoder, nnx.Param))}
    errors = [f"unexpected torch key {key}" for key in sorted(set(state_dict) - {k for k, _, _ in DPT_KEY_TABLE})]
    errors += [f"NNX parameter {path} has no table row" for path in sorted(nnx_paths - table_paths)]
    updates = []
    for torch_key, nnx_path, is_kernel in DPT_KEY_TABLE:
        if torch_key not in state_dict:
            errors.append(f"missing torch key {torch_key}")
            continue
        value = _to_numpy(state_dict[torch_key])
        if is_kernel and value.ndim == 4:
            value = value.transpose(_KERNEL_TO_NNX)
        param = _param(decoder, nnx_path)
        expected = param.get_value().shape
        if value.shape != expected:
            errors.append(f"{torch_key}: shape {value.shape} in NNX layout, {nnx_path} expects {expected}")
            continue
        updates.append((param, value))
    if errors:
        raise ValueError(f"DPT state dict does not match the decoder ({len(errors)} problems): " + "; ".join(errors))
    for param, value in updates:
        param.set_value(jnp.asarray(value, param.get_value().dtype))
    return decoder


def dpt_state_dict(decoder: DPT) -> dict[str, np.ndarray]:
    """The decoder's weights under reference DecodeDPT key names, in torch layouts (the loader's table reversed)."""
    state = {}
    for torch_key, nnx_path, is_kernel in DPT_KEY_TABLE:
        value = np.asarray(_param(decoder, nnx_path).get_value())
        state[torch_key] = value.transpose(_KERNEL_TO_TORCH) if is_kernel else value
    return state
