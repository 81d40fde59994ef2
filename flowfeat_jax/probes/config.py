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
    # Square side fed to the network, a multiple of 2 x patch (448 fits p14 and p16); 0 = the largest such side
    # <= eval_crop (probes/run.py input_sizes).
    c.data.input_size = 448
    # Side of the centred square that is scored (segmentation labels resized there, nearest); 0 = input_size.
    c.data.eval_crop = 0
    c.data.num_workers = 8

    c.pamr = ml_collections.ConfigDict()
    c.pamr.enabled = False
    c.pamr.kernel = "dense"  # 'dense': one size x size kernel (FlowFeat++) | 'rings': dilated 3 x 3 rings (PAMR)
    c.pamr.size = 11
    c.pamr.dilations = (1, 2, 3, 4, 5)  # kernel 'rings' only: 11 x 11 span; PAMR's original: (1, 2, 4, 8, 12, 24)
    c.pamr.num_iter = 10
    c.pamr.scale = 0.1  # affinity |x_i - x_j| / (scale * local std), PAMR's fixed factor

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100_000  # the paper's probes: up to 100k iterations (train configs: the same name)
    c.train.batch_size = 16
    # Adam with L2 weight decay (torch Adam weight_decay) at a constant lr, as the paper's probes.
    c.train.lr = 1e-4
    c.train.weight_decay = 1e-3
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.max_nonfinite = 10  # stop after this many consecutive non-finite steps (each leaves the probe unchanged)
    c.train.allow_changes = False  # resume with changed training settings (the old config kept as config.<step>.json)
    # Names as in the train configs; a config file setting another one (the old `train.steps`) fails here.
    c.train.lock()

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 8
    c.eval.max_images = 0  # 0 = the whole split
    c.eval.num_pictures = 8
    c.eval.min_depth = 1e-3  # depth evaluation range (AdaBins min_depth_eval / max_depth_eval)
    c.eval.max_depth = 10.0

    c.log = base_config().log  # TensorBoard event files beside train_log.jsonl; W&B when a project is named
    return c
