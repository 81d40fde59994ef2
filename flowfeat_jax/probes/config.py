"""The base config of the dense probes; configs/probe_cocostuff.py and configs/probe_nyu.py override it."""

from __future__ import annotations

import ml_collections

from flowfeat_jax.config import base_config


def base_probe_config() -> ml_collections.ConfigDict:
    """Fields shared by both probes (features, data, training, evaluation); tasks add `probe`, `pamr`, `loss`."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ""  # 'segmentation' | 'depth'

    c.features = ml_collections.ConfigDict()
    c.features.run_dir = ""  # trained FlowFeat run dir (or one checkpoints/<step>); '' = build from `model`
    c.features.decoder = "online"  # 'online' (the released model, recipe.md step 12) | 'ema' (the EMA teacher)
    c.features.which = "both"  # 'encoder' | 'flowfeat' | 'both'
    c.model = base_config().model  # used when features.run_dir is '': encoder name/dir, or a random architecture

    c.data = ml_collections.ConfigDict()
    c.data.source = "folder"  # 'folder' | 'tfds' (NYUv2 only)
    c.data.root = ""
    c.data.train_split = ""
    c.data.eval_split = ""
    c.data.train_list = ""  # optional id lists (COCO-Stuff)
    c.data.eval_list = ""
    c.data.tfds_data_dir = ""  # '' = the tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    c.data.num_classes = 0
    c.data.input_size = 448  # square side fed to the network; a multiple of 2 x patch (448 fits p14 and p16)
    # Segmentation labels are resized (nearest) to input_size and scored there.
    c.data.eval_crop = 480  # depth only: side of the centred evaluation square (NYUv2: 480 x 480)
    c.data.num_workers = 8

    c.pamr = ml_collections.ConfigDict()
    c.pamr.enabled = False

    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000
    c.train.batch_size = 16
    c.train.lr = 1e-3  # AdamW, cosine decay to 0 over `steps`
    c.train.weight_decay = 1e-4
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 8
    c.eval.max_images = 0  # 0 = the whole split
    c.eval.num_pictures = 8
    c.eval.min_depth = 1e-3  # depth evaluation range (AdaBins min_depth_eval / max_depth_eval)
    c.eval.max_depth = 10.0
    return c
