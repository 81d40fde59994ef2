"""The base experiment config every `configs/*.py` starts from (released FlowFeat defaults, recipe.md)."""

from __future__ import annotations

import importlib.util
import math
import pathlib
from collections.abc import Callable, Sequence

import ml_collections

# configs/ of a source checkout (the editable install the README uses).
REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# YouTube-VOS 2019 train has 3,471 videos. An epoch is max(#videos, 10 * batch) samples (recipe.md step 10).
YTVOS_NUM_VIDEOS = 3471
KINETICS_NUM_VIDEOS = 240_000
# The reference validates on these 8 DAVIS-2017 val videos (data/filelists/val3_davis2017_480p.txt; recipe.md step 10).
DAVIS2017_VAL3 = (
    "bike-packing", "breakdance", "car-shadow", "dance-twirl", "shooting", "motocross-jump", "lab-coat", "kite-surf"
)


def steps_for(num_videos: int, epochs: int, batch_size: int) -> int:
    """Optimiser steps of `epochs` reference epochs: epoch = max(#videos, 10 * batch) samples (dataloader.py) in
    whole batches (train.py's DataLoader drops the last partial one: YouTube-VOS 3471 // 128 = 27 steps)."""
    samples_per_epoch = max(num_videos, 10 * batch_size)
    return epochs * (samples_per_epoch // batch_size)


def base_config() -> ml_collections.ConfigDict:
    """Released defaults (config/ytvos.yaml of the reference); experiments override a few lines."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.encoder = ""  # HF hub name or local dir (config.json + safetensors); '' = random init of encoder_arch
    c.model.encoder_arch = "dinov2_vits14"  # ViTConfig preset for a random-init encoder
    # Non-zero entries replace the preset's sizes (small random encoders for demos and tests).
    c.model.encoder_size = ml_collections.ConfigDict(
        dict(patch_size=0, hidden_size=0, num_layers=0, num_heads=0, mlp_dim=0)
    )
    c.model.pos_interp = ""  # '' = default of the weights' source ('hf' for Hugging Face), or 'hf' | 'hub'
    c.model.features = 128  # decoder width d (fdim)
    c.model.hooks = ()  # () = every quarter of the depth: [2, 5, 8, 11] for 12 blocks
    c.model.dtype = "float32"  # compute dtype of encoder and decoder; 'bfloat16' for mixed precision
    c.model.random_decoder = False  # ablation: never update the decoder (random-decoder baseline)
    c.model.remat = False  # recompute decoder stages in the backward pass: less activation memory, ~1 more forward

    c.data = ml_collections.ConfigDict()
    c.data.source = "records"  # 'records' (exported flow, tools/export_flow.py) | 'synthetic' (known motions)
    c.data.records = ""  # directory written by tools/export_flow.py
    c.data.videos = ""  # videos to export into data.records first when it holds no manifest yet ('' = don't)
    c.data.method = "dis"  # flow method used when main exports: 'dis' | 'searaft' | 'raft'
    c.data.checkpoint = ""  # flow network weights for 'searaft' / 'raft'
    c.data.iters = 0  # refinement iterations of 'searaft' / 'raft' (0 = the method's default: SEA-RAFT 4, RAFT 20)
    c.data.gap = 2  # partners t +- k, k = 1..gap
    c.data.timeflip = True  # partner t0 + k or t0 - k at random; False: t0 + k only (reference kinetics.yaml)
    c.data.frame_size = 448  # square frame side (short side resized, centre crop)
    c.data.flow_size = 224  # side at which the teacher flow is computed
    c.data.jpeg_quality = 95
    c.data.num_workers = 2
    c.data.prefetch = 2

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128
    c.train.num_steps = steps_for(YTVOS_NUM_VIDEOS, 500, 128)
    c.train.lr = 1e-4
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.weight_decay = 0.0
    c.train.input_size = 224  # crop side fed to the encoder
    c.train.crop_scale = (0.5, 0.75)
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.max_nonfinite = 10  # stop after this many consecutive non-finite steps
    c.train.allow_changes = False  # resume with changed trajectory settings (the old config kept as config.<step>.json)

    c.loss = ml_collections.ConfigDict()
    c.loss.flow = "l1"  # 'l1' released | 'l2' ablation
    c.loss.flow_weight = 0.1  # 0 = the "no L_L1" ablation
    c.loss.grad_weight = 1.0  # 0 = the "no L_grad" ablation
    c.loss.sigma = 0.1
    c.loss.ridge_alpha = 0.1  # paper text: 1.0; small-alpha ablation: 1e-3
    c.loss.flow_map = "ridge"  # 'ridge' released (per-image map from the teacher) | 'linear': Tab. 3 naive ablation,
    # one learned linear layer from the online features to flow, trained with the decoder
    c.loss.norm_flow = True

    c.ema = ml_collections.ConfigDict()
    c.ema.enabled = True  # False: teacher = online decoder (stop-gradient)
    c.ema.beta = 0.999
    c.ema.update_after_step = 1
    c.ema.update_every = 5
    c.ema.power = 2.0 / 3.0
    c.ema.inv_gamma = 1.0

    c.eval = ml_collections.ConfigDict()
    c.eval.davis = ""  # DAVIS root for validation ('' = none); the folder layout of flowfeat_jax/eval/davis.py
    c.eval.split = "val"  # ImageSets/<split>.txt (or ImageSets/2017/<split>.txt)
    c.eval.sequences = ""  # comma-separated subset of the split ('' = all)
    c.eval.protocols = "knn"  # comma-separated: knn, linear
    c.eval.every = 0  # validate every N steps (0 = only after the last step)
    c.eval.keep_best = False  # also keep the checkpoint of the best J&F (first of eval.protocols) in workdir/best
    c.eval.decoder = "online"  # decoder validated: 'online' (reference train.py, the released model) | 'ema'
    c.eval.short_side = 480  # evaluation input short side (rounded down to an even token grid)
    c.eval.max_frames = 0  # truncate sequences for quick checks (0 = all frames)

    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = True  # TensorBoard event files beside metrics.jsonl (tensorboardX, no TensorFlow)
    c.log.wandb_project = ""  # W&B project to log to ('' = none; needs `pip install wandb`)
    return c


def cpu_config() -> ml_collections.ConfigDict:
    """Released loss, ridge and EMA settings with a model and crops small enough for two CPU cores (demo and
    davis_small): a random-init ViT-S/14 shape cut to width 96 and 4 blocks, d = 64, 224-px frames, 112-px flow and
    crops, batch 8, lr 3e-4 (released 1e-4: a few thousand images need the faster rate to move the decoder)."""
    config = base_config()
    config.model.encoder_arch = "dinov2_vits14"
    config.model.encoder_size.hidden_size = 96
    config.model.encoder_size.num_layers = 4
    config.model.encoder_size.num_heads = 4
    config.model.encoder_size.mlp_dim = 384
    config.model.features = 64
    config.data.frame_size = 224
    config.data.flow_size = 112
    config.data.num_workers = 0
    config.train.input_size = 112
    config.train.batch_size = 8
    config.train.lr = 3e-4
    config.eval.short_side = 224  # 224 x 392 inputs (patch 14) for DAVIS frames
    return config


def paper_config(
    encoder: str, encoder_arch: str, num_videos: int, epochs: int, val_every_epochs: int
) -> ml_collections.ConfigDict:
    """A paper setting: released defaults, a Hugging Face encoder and the step count of `epochs` reference epochs.

    DINO/DINOv2 encoders resize their position tables as the torch-hub code the reference trains with
    (`pos_interp='hub'`, recipe.md "Backbones"). Model selection as the reference's train.py: with
    `--config.eval.davis=<DAVIS-2017 root>` the run validates every `val_every_epochs` epochs on the 8 videos of
    DAVIS2017_VAL3 and keeps the best-J&F checkpoint in workdir/best beside the latest (recipe.md step 10).
    """
    config = base_config()
    config.model.encoder = encoder
    config.model.encoder_arch = encoder_arch
    if encoder_arch.startswith(("dino_", "dinov2_")):
        config.model.pos_interp = "hub"
    config.train.num_steps = steps_for(num_videos, epochs, config.train.batch_size)
    config.eval.split = "val"
    config.eval.sequences = ",".join(DAVIS2017_VAL3)
    config.eval.every = steps_for(num_videos, val_every_epochs, config.train.batch_size)
    config.eval.keep_best = True
    return config


def ytvos_config(encoder: str, encoder_arch: str) -> ml_collections.ConfigDict:
    """The released config/ytvos.yaml: YouTube-VOS 2019 at 30 fps (`train_all_frames`, recipe.md step 11), 500
    epochs (paper), validation every 10 epochs, ridge alpha 0.1, pairs in both time directions, and the released
    flow teacher RAFT-sintel with 20 iterations (recipe.md step 9). Why RAFT: where the paper and the released config
    differ, the released config is the default (recipe.md). The paper's main results use SEA-RAFT M instead (Tab. 3
    (f): RAFT costs 0.6 J&F); that is one override away: `--config.data.method=searaft --config.data.iters=0` (and
    records exported with `--method searaft`, or `--config.data.checkpoint=<SEA-RAFT-M weights>` when main exports).
    Export of the released teacher's flow: `python tools/export_flow.py --videos /data/youtube-vos-2019
    --out /data/flow_ytvos_raft --method raft --checkpoint raft-sintel.pth --iters 20 --device cuda`."""
    config = paper_config(encoder, encoder_arch, YTVOS_NUM_VIDEOS, epochs=500, val_every_epochs=10)
    config.data.method = "raft"
    config.data.iters = 20
    return config


def kinetics_config(encoder: str, encoder_arch: str) -> ml_collections.ConfigDict:
    """The released config/kinetics.yaml (recipe.md step 13): ridge alpha 1.0, forward pairs only (t1 = t0 + k),
    SEA-RAFT (M, its default 4 iterations), 100 epochs, validation every epoch."""
    config = paper_config(encoder, encoder_arch, KINETICS_NUM_VIDEOS, epochs=100, val_every_epochs=1)
    config.loss.ridge_alpha = 1.0
    config.data.timeflip = False
    config.data.method = "searaft"
    return config


def saved_run_config(saved: dict) -> ml_collections.ConfigDict:
    """The config a run recorded (checkpoint meta), with today's defaults for the fields it predates (a run written
    before e.g. `loss.flow_map` existed trained with that field's default)."""
    config = base_config()
    with config.unlocked():
        config.update(saved)
    return config


def load_config(name: str) -> ml_collections.ConfigDict:
    """get_config() of configs/<name>.py, or of the config file at path `name`."""
    path = pathlib.Path(name)
    if not path.is_file():
        path = REPO_CONFIGS / f"{name.removesuffix('.py')}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in REPO_CONFIGS.glob("*.py")))
        raise FileNotFoundError(f"no config file {name!r} (nor {path}); configs/ has: {known}")
    spec = importlib.util.spec_from_file_location(f"flowfeat_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(config_file_syntax_error(path, e)) from None
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} defines no get_config() (it must return an ml_collections.ConfigDict)")
    return module.get_config()


def config_file_syntax_error(path: str | pathlib.Path, error: SyntaxError) -> str:
    """One line for a config file that does not parse: the file, line and Python's reason."""
    return f"config file {path}: line {error.lineno}: {error.msg}"


# --------------------------------------------------------------------------------------------------------------------
# Validation: one pass over the whole config before any work (issue 21 item 8)
# --------------------------------------------------------------------------------------------------------------------

# A rule: (test of the value, the expected range in words). Keys are written as on the command line.
Rule = tuple[Callable[[object], bool], str]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> Rule:
    return (lambda v: _number(v) and v >= low), f"a finite number >= {low:g}"


def above(low: float) -> Rule:
    return (lambda v: _number(v) and v > low), f"a finite number > {low:g}"


def half_open(low: float, high: float) -> Rule:
    return (lambda v: _number(v) and low <= v < high), f"in [{low:g}, {high:g})"


def closed(low: float, high: float) -> Rule:
    return (lambda v: _number(v) and low <= v <= high), f"in [{low:g}, {high:g}]"


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def _crop_scale(value: object) -> bool:
    pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    return len(pair) == 2 and all(_number(v) for v in pair) and 0 < pair[0] <= pair[1] <= 1


EVAL_PROTOCOLS = ("knn", "linear")
FLOW_METHODS = ("dis", "searaft", "raft")  # flowfeat_jax.flow.methods.METHODS (checked equal in the tests)

# Every field of base_config() with a natural range; fields not listed are strings checked where they are used
# (paths, encoder names) or booleans.
CONFIG_RULES: dict[str, Rule] = {
    "seed": at_least(0),
    "model.encoder_size.patch_size": at_least(0),
    "model.encoder_size.hidden_size": at_least(0),
    "model.encoder_size.num_layers": at_least(0),
    "model.encoder_size.num_heads": at_least(0),
    "model.encoder_size.mlp_dim": at_least(0),
    "model.pos_interp": one_of("", "hf", "hub"),
    "model.features": at_least(1),
    "model.dtype": one_of("float32", "bfloat16", "float16"),
    "data.source": one_of("records", "synthetic"),
    "data.method": one_of(*FLOW_METHODS),
    "data.gap": at_least(1),
    "data.frame_size": at_least(8),
    "data.flow_size": at_least(8),
    "data.jpeg_quality": closed(1, 100),
    "data.num_workers": at_least(0),
    "data.prefetch": at_least(1),
    "train.batch_size": at_least(1),
    "train.num_steps": at_least(1),
    "train.lr": at_least(0),
    "train.b1": half_open(0, 1),
    "train.b2": half_open(0, 1),
    "train.weight_decay": at_least(0),
    "train.input_size": at_least(2),
    "train.crop_scale": (_crop_scale, "two numbers (low, high) with 0 < low <= high <= 1"),
    "train.log_every": at_least(1),
    "train.checkpoint_every": at_least(1),
    "train.keep_checkpoints": at_least(1),
    "train.max_nonfinite": at_least(1),
    "loss.flow": one_of("l1", "l2"),
    "loss.flow_map": one_of("ridge", "linear"),
    "loss.flow_weight": at_least(0),
    "loss.grad_weight": at_least(0),
    "loss.sigma": above(0),
    "loss.ridge_alpha": above(0),
    "ema.beta": half_open(0, 1),
    "ema.update_after_step": at_least(0),
    "ema.update_every": at_least(1),
    "ema.power": above(0),
    "ema.inv_gamma": above(0),
    "eval.every": at_least(0),
    "eval.decoder": one_of("online", "ema"),
    "data.iters": at_least(0),
}


def config_value(config: ml_collections.ConfigDict, key: str) -> object:
    """The value at a dotted key (`train.crop_scale`)."""
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def check_eval_options(
    protocols: Sequence[str],
    short_side: int,
    max_frames: int,
    *,
    patch_size: int | None = None,
    names: Sequence[str] = ("eval.protocols", "eval.short_side", "eval.max_frames"),
) -> list[str]:
    """Problems with DAVIS evaluation options (config keys, or the flags of flowfeat_jax.evaluate via `names`).

    `short_side` must hold one even token grid (2 patches; recipe, Model); label propagation needs the first frame
    and at least one more (max_frames 0 = all).
    """
    protocols_name, short_name, frames_name = names
    problems = []
    unknown = [p for p in protocols if p not in EVAL_PROTOCOLS]
    if unknown or not protocols:
        problems.append(f"{protocols_name} must be a comma-separated subset of {', '.join(EVAL_PROTOCOLS)}, "
                        f"got {','.join(protocols)!r}")
    lowest = 2 * patch_size if patch_size else 2
    if not (_number(short_side) and short_side >= lowest):
        problems.append(f"{short_name} must be >= {lowest} (two patches), got {short_side}")
    if not (_number(max_frames) and (max_frames == 0 or max_frames >= 2)):
        problems.append(f"{frames_name} must be 0 (all frames) or >= 2 (a first frame and one to propagate to), "
                        f"got {max_frames}")
    return problems


def check_evaluate_flags(protocols: Sequence[str], short_side: int, max_frames: int, patch_size: int) -> None:
    """`check_eval_options` for the flags of flowfeat_jax.evaluate (named as flags), raising on any problem."""
    names = ("--protocols", "--short_side", "--max_frames")
    raise_problems(check_eval_options(protocols, short_side, max_frames, patch_size=patch_size, names=names), "")


def raise_problems(problems: Sequence[str], what: str = "invalid config: ") -> None:
    if problems:
        raise ValueError(what + "; ".join(problems))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every ranged field and the relations between fields; one ValueError listing every problem, each naming
    its key as the user writes it and the expected range. Call before any work (every entry point that takes a
    training config does)."""
    problems = []
    for key, (test, expected) in CONFIG_RULES.items():
        value = config_value(config, key)
        if not test(value):
            problems.append(f"{key} must be {expected}, got {value!r}")
    data, train = config.data, config.train
    if _number(data.flow_size) and _number(data.frame_size) and data.flow_size > data.frame_size:
        problems.append(f"data.flow_size ({data.flow_size}) must be <= data.frame_size ({data.frame_size})")
    if _number(train.input_size) and _number(data.frame_size) and train.input_size > data.frame_size:
        problems.append(f"train.input_size ({train.input_size}) must be <= data.frame_size ({data.frame_size})")
    if config.loss.flow_weight == 0 and config.loss.grad_weight == 0:
        problems.append("loss.flow_weight and loss.grad_weight are both 0: nothing to train")
    hooks = tuple(config.model.hooks)
    if hooks and (len(hooks) != 4 or not all(isinstance(h, int) and h >= 0 for h in hooks)):
        problems.append(f"model.hooks must be () (every quarter) or 4 block indices >= 0, got {hooks}")
    protocols = [p for p in config.eval.protocols.split(",") if p]
    problems += check_eval_options(protocols, config.eval.short_side, config.eval.max_frames)
    raise_problems(problems)
