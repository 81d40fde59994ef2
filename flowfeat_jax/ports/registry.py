"""The encoder families FlowFeat can use: each one's config, module and Hugging Face port, and `from_pretrained`.

A family is a frozen config dataclass with presets (classmethods named after checkpoints), an NNX module with the
ViT interface (`__call__(images, *, hooks) -> vit.ViTOutput`, `.norm`, `.cfg` with patch_size, hidden_size,
num_layers, num_prefix_tokens, family, dtype, param_dtype; `models.flowfeat.ENCODER_MODULES` maps the config type to
it), and a port module here in ports/ that turns an HF config.json into the config and fills the module from the
checkpoint through an explicit key table.

Used by `from_pretrained` (HF `model_type` -> family) and `ports.build.encoder_config` (preset name -> config). To
add a family, see README "Add a backbone".
"""

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from flowfeat_jax import errors
from flowfeat_jax.models.dinov3 import DINOv3Config
from flowfeat_jax.models.flowfeat import ENCODER_MODULES
from flowfeat_jax.models.vit import ViTConfig
from flowfeat_jax.ports import dinov3 as dinov3_ports
from flowfeat_jax.ports import vit as vit_ports


@dataclasses.dataclass(frozen=True)
class EncoderFamily:
    """One encoder family.

    Attributes:
      name: short name, e.g. 'vit'.
      config_class: frozen config dataclass; its public classmethods returning a config are the presets.
      hf_model_types: `model_type` values of HF config.json files this family loads.
      config_from_hf: function(hf_config: dict) -> config.
      hf_key_table: function(config) -> list of ports.vit.KeyRow.
      load_hf_state_dict: function(module, state: dict of numpy arrays) -> None, strict.
    """

    name: str
    config_class: type
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable
    hf_key_table: Callable
    load_hf_state_dict: Callable

    @property
    def module_class(self) -> type:
        """NNX module built as `module_class(cfg, *, rngs)` (`models.flowfeat.ENCODER_MODULES`)."""
        return ENCODER_MODULES[self.config_class]

    def presets(self) -> tuple[str, ...]:
        """Names of the config presets (public classmethods of the config class)."""
        return tuple(name for name, attr in vars(self.config_class).items()
                     if isinstance(attr, classmethod) and not name.startswith("_"))


FAMILIES: tuple[EncoderFamily, ...] = (
    EncoderFamily(
        name="vit",
        config_class=ViTConfig,
        hf_model_types=("dinov2", "dinov2_with_registers", "vit", "vit_mae"),
        config_from_hf=vit_ports.vit_config_from_hf,
        hf_key_table=vit_ports.hf_key_table,
        load_hf_state_dict=vit_ports.load_hf_state_dict,
    ),
    EncoderFamily(
        name="dinov3",
        config_class=DINOv3Config,
        hf_model_types=("dinov3_vit",),
        config_from_hf=dinov3_ports.dinov3_config_from_hf,
        hf_key_table=dinov3_ports.hf_key_table,
        load_hf_state_dict=dinov3_ports.load_hf_state_dict,
    ),
)


def hf_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.hf_model_types)


def family_for_model_type(model_type: str | None) -> EncoderFamily:
    """The family that loads HF checkpoints of this `model_type`; ValueError naming the supported ones otherwise."""
    for family in FAMILIES:
        if model_type in family.hf_model_types:
            return family
    raise ValueError(f"unsupported HF model_type {model_type!r}; expected one of {hf_model_types()}")


def family_for_config(cfg) -> EncoderFamily:
    """The family whose config class `cfg` is an instance of."""
    for family in FAMILIES:
        if isinstance(cfg, family.config_class):
            return family
    raise ValueError(f"no encoder family for config type {type(cfg).__name__}; known: "
                     f"{[f.config_class.__name__ for f in FAMILIES]}")


def preset_config(name: str, **overrides):
    """The config of a preset by name (e.g. 'dinov2_vits14', 'dinov3_vitb16'), with dataclass fields replaced."""
    for family in FAMILIES:
        if name in family.presets():
            return dataclasses.replace(getattr(family.config_class, name)(), **overrides)
    known = sorted(p for family in FAMILIES for p in family.presets())
    raise ValueError(f"unknown encoder preset {name!r}; known: {known}")


def _read_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """model.safetensors (or its sharded index) or pytorch_model.bin from a checkpoint directory."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    bin_file = directory / "pytorch_model.bin"
    if bin_file.is_file():
        import torch  # heavy, and only for this legacy format

        return {k: v.float().numpy() for k, v in torch.load(bin_file, map_location="cpu", weights_only=True).items()}
    raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {directory}")


# A hub model id: `name` or `org/name` of letters, digits, '-', '_', '.'; anything else is a local path.
_HF_REPO_ID = re.compile(r"(?!\.)[\w.-]+(/(?!\.)[\w.-]+)?")


def _hub_snapshot(name: str) -> pathlib.Path:
    """Local directory with config.json and the weights of an HF hub model (the HF cache; downloads when online)."""
    import huggingface_hub  # heavy (and network code), only for hub names
    from huggingface_hub.utils import EntryNotFoundError

    try:
        config = huggingface_hub.hf_hub_download(name, "config.json")
    except Exception as error:  # offline and not cached, unknown repo, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FileNotFoundError(f"cannot find HF model {name!r} locally or on the hub: {reason}") from error
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            huggingface_hub.hf_hub_download(name, filename)
            break
        except EntryNotFoundError:
            continue
    else:
        raise FileNotFoundError(f"HF model {name!r} has neither model.safetensors nor pytorch_model.bin")
    return pathlib.Path(config).parent


def from_pretrained(name_or_dir: str, *, dtype=jnp.float32, pos_interp: str | None = None) -> nnx.Module:
    """An encoder with the weights of an HF checkpoint: a local directory (config.json + weights) or a hub name.

    The config's `model_type` picks the encoder family (`FAMILIES`): a ViT for dinov2,
    dinov2_with_registers, vit and vit_mae, a DINOv3 for dinov3_vit, ...

    Args:
      name_or_dir: e.g. "facebook/dinov2-small" or a directory written by `save_pretrained`.
      dtype: compute dtype (parameters stay f32).
      pos_interp: 'hf' (default for HF weights) or 'hub' position-table resizing; None keeps 'hf'. Only for
        encoders with a position table (ViTConfig).
    """
    path = pathlib.Path(name_or_dir)
    if not path.is_dir() and not _HF_REPO_ID.fullmatch(str(name_or_dir)):
        raise FileNotFoundError(f"encoder {name_or_dir}: no such directory (nor a Hugging Face model id 'org/name')")
    directory = path if path.is_dir() else _hub_snapshot(str(name_or_dir))
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    hf_config = errors.read_json_object(config_file)
    family = family_for_model_type(hf_config.get("model_type"))
    cfg = family.config_from_hf(hf_config)
    overrides = {"dtype": dtype}
    if pos_interp is not None:
        if not isinstance(cfg, ViTConfig):
            raise ValueError(f"pos_interp={pos_interp!r} applies to ViT position tables; a {family.name} encoder "
                             "has none")
        overrides["pos_interp"] = pos_interp
    cfg = dataclasses.replace(cfg, **overrides)
    # Abstract parameters: nothing is randomly initialised, and any leaf the table misses stays unusable.
    model = nnx.eval_shape(lambda: family.module_class(cfg, rngs=nnx.Rngs(0)))
    family.load_hf_state_dict(model, _read_weights(directory))
    return model
