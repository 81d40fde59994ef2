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


def steps_for(num_videos: int, epochs: int, batch_size: int) -> int:
    """Optimiser steps of `epochs` reference epochs: epoch = max(#videos, 10 * batch) samples (dataloader.py)."""
    samples_per_epoch = max(num_videos, 10 * batch_size)
    return -(-epochs * samples_per_epoch // batch_size)


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
    c.data.gap = 2  # partners t +- k, k = 1..gap
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
    c.eval.short_side = 480  # evaluation input short side (rounded down to an even token grid)
    c.eval.max_frames = 0  # truncate sequences for quick checks (0 = all frames)
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


def paper_config(encoder: str, encoder_arch: str, num_videos: int, epochs: int) -> ml_collections.ConfigDict:
    """A paper setting: released defaults, a Hugging Face encoder and the step count of `epochs` reference epochs."""
    config = base_config()
    config.model.encoder = encoder
    config.model.encoder_arch = encoder_arch
    config.train.num_steps = steps_for(num_videos, epochs, config.train.batch_size)
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
