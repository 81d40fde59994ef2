"""Hugging Face DINOv3 ViT checkpoints (`model_type` dinov3_vit) -> `flowfeat_jax.models.dinov3.DINOv3`.

One explicit table, `hf_key_table(cfg)`, in the KeyRow style of `ports.vit` (NNX path, layout, on-disk names,
transformers-5 in-memory names). On disk (the hub's model.safetensors, and what `save_pretrained` writes) the blocks
are `layer.N.*`; a transformers-5 module's state_dict calls them `model.layer.N.*`. The SwiGLU gate|up projections
are concatenated into the fused `mlp.w12` along the torch output axis. Loading is strict (`ports.vit.load_table`):
every missing, unmapped or mis-shaped key is named in one error. `ports.registry.from_pretrained` loads these
checkpoints by their model_type.
"""

import re
from collections.abc import Iterator, Mapping

import numpy as np

from flowfeat_jax.models.dinov3 import DINOv3, DINOv3Config
from flowfeat_jax.ports.vit import KeyRow, load_table

# The masked-image-modelling token is a pre-training part the encoder never uses.
_IGNORED_KEYS = re.compile(r"^embeddings\.mask_token$")
# transformers DINOv3ViT MLPs: plain fc1/GELU/fc2, or SwiGLU silu(gate) * up (hub "plus" and 7B models).
_MLP_ACTIVATIONS = {False: "gelu", True: "silu"}


def _block_rows(cfg: DINOv3Config, i: int) -> Iterator[KeyRow]:
    disk, memory, out = f"layer.{i}.", f"model.layer.{i}.", f"blocks.{i}."

    def row(nnx_name, layout, *torch_names):
        return KeyRow(out + nnx_name, layout, tuple(disk + n for n in torch_names),
                      tuple(memory + n for n in torch_names))

    for norm in ("norm1", "norm2"):
        yield row(f"{norm}.scale", "copy", f"{norm}.weight")
        yield row(f"{norm}.bias", "copy", f"{norm}.bias")
    for proj, has_bias in (("q_proj", cfg.query_bias), ("k_proj", cfg.key_bias), ("v_proj", cfg.value_bias),
                           ("o_proj", cfg.proj_bias)):
        yield row(f"attn.{proj}.kernel", "linear", f"attention.{proj}.weight")
        if has_bias:
            yield row(f"attn.{proj}.bias", "copy", f"attention.{proj}.bias")
    for k in (1, 2):
        yield row(f"ls{k}.gamma", "copy", f"layer_scale{k}.lambda1")
    for param, nnx_param, layout in (("weight", "kernel", "linear"), ("bias", "bias", "copy")):
        if cfg.swiglu:
            yield row(f"mlp.w12.{nnx_param}", layout, f"mlp.gate_proj.{param}", f"mlp.up_proj.{param}")
            yield row(f"mlp.w3.{nnx_param}", layout, f"mlp.down_proj.{param}")
        else:
            yield row(f"mlp.fc1.{nnx_param}", layout, f"mlp.up_proj.{param}")
            yield row(f"mlp.fc2.{nnx_param}", layout, f"mlp.down_proj.{param}")


def hf_key_table(cfg: DINOv3Config) -> list[KeyRow]:
    """The full torch -> NNX table for an HF DINOv3 ViT checkpoint of this config (the only place names are mapped).
    The RoPE frequencies (`rope_embeddings.inv_freq`) are a non-persistent buffer, recomputed from rope_theta."""

    def same(nnx_path, layout, name):
        return KeyRow(nnx_path, layout, (name,), (name,))

    rows = [
        same("patch_embed.proj.kernel", "conv", "embeddings.patch_embeddings.weight"),
        same("patch_embed.proj.bias", "copy", "embeddings.patch_embeddings.bias"),
        same("cls_token", "copy", "embeddings.cls_token"),
        same("register_tokens", "copy", "embeddings.register_tokens"),  # (1, 0, C) without registers
    ]
    for i in range(cfg.num_layers):
        rows.extend(_block_rows(cfg, i))
    rows += [same("norm.scale", "copy", "norm.weight"), same("norm.bias", "copy", "norm.bias")]
    return rows


def dinov3_config_from_hf(hf_config: Mapping) -> DINOv3Config:
    """DINOv3Config from an HF config.json dict (model_type dinov3_vit); ValueError naming any unsupported field."""
    if hf_config.get("model_type") != "dinov3_vit":
        raise ValueError(f"expected HF model_type 'dinov3_vit', got {hf_config.get('model_type')!r}")
    swiglu = bool(hf_config.get("use_gated_mlp", False))
    act = hf_config.get("hidden_act", "gelu")
    if act != _MLP_ACTIVATIONS[swiglu]:
        kind = "gated (SwiGLU)" if swiglu else "plain"
        raise ValueError(f"unsupported hidden_act {act!r} for a {kind} DINOv3 MLP; implemented: "
                         f"{_MLP_ACTIVATIONS[swiglu]!r}")
    if not hf_config.get("mlp_bias", True):
        raise ValueError("unsupported mlp_bias=False; DINOv3 MLPs with biases only")
    if hf_config.get("num_channels", 3) != 3:
        raise ValueError(f"unsupported num_channels {hf_config['num_channels']}; expected 3 (RGB)")
    patch = hf_config.get("patch_size", 16)
    if not isinstance(patch, int):
        raise ValueError(f"only square int patch_size is supported, got {patch!r}")
    return DINOv3Config(
        patch_size=patch,
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        mlp_dim=hf_config["intermediate_size"],
        num_registers=hf_config.get("num_register_tokens", 0),
        swiglu=swiglu,
        query_bias=hf_config.get("query_bias", True),
        key_bias=hf_config.get("key_bias", False),
        value_bias=hf_config.get("value_bias", True),
        proj_bias=hf_config.get("proj_bias", True),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-5),
        rope_theta=hf_config.get("rope_theta", 100.0),
    )


def load_hf_state_dict(model: DINOv3, state: Mapping[str, np.ndarray]) -> None:
    """Fill every parameter of `model` from an HF DINOv3 ViT state dict (numpy arrays), strictly, through
    `hf_key_table`."""
    load_table(model, state, hf_key_table(model.cfg), ignored=_IGNORED_KEYS, what="DINOv3")
