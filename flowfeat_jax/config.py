"""The base experiment config every `configs/*.py` starts from (released FlowFeat defaults, recipe.md)."""

from __future__ import annotations

import importlib.util
import pathlib

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

    c.loss = ml_collections.ConfigDict()
    c.loss.flow = "l1"  # 'l1' released | 'l2' ablation
    c.loss.flow_weight = 0.1  # 0 = the "no L_L1" ablation
    c.loss.grad_weight = 1.0  # 0 = the "no L_grad" ablation
    c.loss.sigma = 0.1
    c.loss.ridge_alpha = 0.1  # paper text: 1.0; small-alpha ablation: 1e-3
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
    records exported with `--method searaft`, or `--config.data.checkpoint=<SEA-RAFT-M weights>` when main exports)."""
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
    spec.loader.exec_module(module)
    return module.get_config()
