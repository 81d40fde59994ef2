"""Settings exist in one place: every field of base_config() reaches a consumer (a settings dataclass built from its
section, or a reader named in DIRECT_READERS), and the step, torch-reference and export configs carry the values."""

import ast
import dataclasses
import pathlib

import ml_collections
import pytest

import flowfeat_jax
from flowfeat_jax import settings
from flowfeat_jax.config import base_config
from flowfeat_jax.data import export
from flowfeat_jax.torch_ref.train import TorchStepConfig
from flowfeat_jax.train import loop

PACKAGE = pathlib.Path(flowfeat_jax.__file__).parent

# Keys that no settings dataclass takes, each with the file that reads it by name (as <section>.<key>,
# <section>_cfg.<key>, or config.<key> at the top level). A whole sub-section read at once is listed once.
DIRECT_READERS = {
    "seed": "train/loop.py",  # train(): model init, data order, per-step randomness
    "model.encoder": "ports/build.py",  # build_flowfeat
    "model.encoder_arch": "ports/build.py",  # encoder_config
    "model.encoder_size": "ports/build.py",  # encoder_config: the non-zero entries, as preset_config(**sizes)
    "model.pos_interp": "ports/build.py",  # build_flowfeat
    "model.features": "ports/build.py",  # build_flowfeat
    "model.hooks": "ports/build.py",  # build_flowfeat
    "model.dtype": "ports/build.py",  # build_flowfeat, encoder_config
    "model.random_decoder": "train/loop.py",  # train(): make_optimizer(..., random_decoder)
    "model.remat": "ports/build.py",  # build_flowfeat
    "data.source": "train/loop.py",  # make_batches
    "data.records": "train/loop.py",  # ensure_records
    "data.videos": "train/loop.py",  # ensure_records
    "data.timeflip": "train/loop.py",  # make_batches
    "data.num_workers": "train/loop.py",  # make_batches
    "data.prefetch": "train/loop.py",  # make_batches
    "train.batch_size": "train/loop.py",  # make_batches, train()
    "train.num_steps": "train/loop.py",  # train()
    "train.log_every": "train/loop.py",  # train()
    "train.checkpoint_every": "train/loop.py",  # train()
    "train.keep_checkpoints": "train/loop.py",  # train()
    "train.max_nonfinite": "train/loop.py",  # train()
    "train.allow_changes": "train/run_support.py",  # resume rules shared by the train loop and the probe trainer
    "eval.davis": "apps/validation.py",  # davis_validation
    "eval.split": "apps/validation.py",
    "eval.sequences": "apps/validation.py",
    "eval.protocols": "apps/validation.py",
    "eval.short_side": "apps/validation.py",
    "eval.max_frames": "apps/validation.py",
    "eval.every": "train/loop.py",  # train()
    "eval.keep_best": "train/loop.py",  # train(): BestCheckpoint
    "eval.decoder": "train/loop.py",  # train(): the decoder validated
    "log.tensorboard": "train/loop.py",  # train(): MetricWriter
    "log.wandb_project": "train/loop.py",  # train(): MetricWriter
}


def dataclass_consumers() -> dict[str, str]:
    """Config key -> the dataclass built from it (train/step.py StepConfig, torch_ref TorchStepConfig, ExportConfig)."""
    consumers = {}
    for cls, section in ((settings.LossConfig, "loss"), (settings.EmaConfig, "ema"), (settings.CropConfig, "train"),
                         (settings.AdamWConfig, "train")):
        consumers.update({f"{section}.{field.name}": cls.__name__ for field in dataclasses.fields(cls)})
    consumers.update({f"data.{name}": "ExportConfig.from_data_config" for name in export.RUN_FIELDS})
    return consumers


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def reads_key(path: pathlib.Path, key: str) -> bool:
    """Whether the file reads `key` as an attribute of its section: config.data.videos, data_cfg.videos, data.videos."""
    section, _, name = key.rpartition(".")
    owners = {section.rpartition(".")[2], f"{section.rpartition('.')[2]}_cfg"} if section else {"config"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == name:
            owner = node.value
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
            if owner_name in owners:
                return True
    return False


def test_every_base_config_field_reaches_a_consumer():
    consumers = dataclass_consumers()
    leaves = leaf_keys(base_config())

    def reader(key):
        return next((k for k in DIRECT_READERS if key == k or key.startswith(k + ".")), None)

    unread = [key for key in leaves if key not in consumers and reader(key) is None]
    assert not unread, f"config fields no dataclass takes and no reader reads: {unread}"
    assert not [key for key in leaves if key in consumers and reader(key)], "a key listed as both kinds of consumer"
    assert not set(consumers) - set(leaves), "a dataclass field with no config key"
    stale = [k for k in DIRECT_READERS if not any(leaf == k or leaf.startswith(k + ".") for leaf in leaves)]
    assert not stale, f"DIRECT_READERS names keys base_config() no longer has: {stale}"
    misnamed = [(key, path) for key, path in DIRECT_READERS.items() if not reads_key(PACKAGE / path, key)]
    assert not misnamed, f"the named reader does not read the key: {misnamed}"


@pytest.mark.parametrize("section", ["loss", "ema"])
def test_a_key_the_step_does_not_take_stops_the_build(section):
    """A new loss/ema field that is not wired through is an error, not a setting silently ignored."""
    config = base_config()
    config[section].unwired = 1.0
    with pytest.raises(TypeError, match="unwired"):
        loop.step_config(config)
    with pytest.raises(TypeError, match="unwired"):
        TorchStepConfig.from_sections(config.train, config.loss, config.ema)


def test_step_torch_and_export_configs_carry_every_value():
    config = base_config()
    config.update_from_flattened_dict({
        "train.input_size": 96, "train.crop_scale": (0.3, 0.9), "train.lr": 3e-4, "train.b1": 0.8, "train.b2": 0.95,
        "train.weight_decay": 0.05, "loss.flow": "l2", "loss.flow_weight": 0.4, "loss.grad_weight": 0.0,
        "loss.sigma": 0.2, "loss.ridge_alpha": 1e-3, "loss.flow_map": "linear", "loss.norm_flow": False,
        "ema.enabled": False, "ema.beta": 0.9, "ema.update_after_step": 3, "ema.update_every": 2, "ema.power": 0.5,
        "ema.inv_gamma": 2.0,
        "data.method": "raft", "data.checkpoint": "raft.pth", "data.iters": 12, "data.gap": 3,
        "data.frame_size": 320, "data.flow_size": 160, "data.jpeg_quality": 90,
    })
    step_cfg = loop.step_config(config)
    torch_cfg = TorchStepConfig.from_sections(config.train, config.loss, config.ema)
    assert dataclasses.asdict(step_cfg.loss) == dataclasses.asdict(torch_cfg.loss) == config.loss.to_dict()
    assert dataclasses.asdict(step_cfg.ema) == dataclasses.asdict(torch_cfg.ema) == config.ema.to_dict()
    assert step_cfg.crop == settings.CropConfig(input_size=96, crop_scale=(0.3, 0.9))
    assert torch_cfg.input_size == 96
    assert torch_cfg.adamw == settings.AdamWConfig(lr=3e-4, b1=0.8, b2=0.95, weight_decay=0.05)
    exported = export.ExportConfig.from_data_config(config.data)
    assert {name: getattr(exported, name) for name in export.RUN_FIELDS} == {
        "method": "raft", "checkpoint": "raft.pth", "iters": 12, "gap": 3, "frame_size": 320, "flow_size": 160,
        "jpeg_quality": 90,
    }
    # '' and 0 in the config are "unset": the exporter's None (the method's own default).
    unset = export.ExportConfig.from_data_config(base_config().data)
    assert (unset.checkpoint, unset.iters) == (None, None)
