r"""NYUv2 monocular depth probe (FlowFeat paper, depth estimation): AdaBins-style head with 256 adaptive bins.

Paper settings (recipe.md "Evaluation"): frozen features of a trained FlowFeat run; the scale-invariant log loss + a
gradient loss on NYUv2 train; Adam lr 1e-4 with weight decay 1e-5, batch 16, up to 100k steps; scored on 480 x 480
centre crops of the test images (the centre square of the 480 x 640 frame, Eigen crop, valid depth in (1e-3, 10) m):
RMSE, AbsRel, delta1..3. The network sees the crop at the largest multiple of 2 x patch <= 480 (480 for patch 16,
476 for patch 14); predictions are resized back to 480 x 480.

Commands:
  python -m flowfeat_jax.probe --config configs/probe_nyu.py --config.features.run_dir=runs/ytvos_dinov2_s14
      (reads the prepared tfds nyu_depth_v2; `tfds build nyu_depth_v2` once)
  python -m flowfeat_jax.probe --config configs/probe_nyu.py --config.features.run_dir=runs/ytvos_dinov2_s14 \
      --config.data.source=folder --config.data.root=/data/nyu --config.data.eval_split=test
"""

from flowfeat_jax.probes.config import base_probe_config


def get_config():
    c = base_probe_config()
    c.task = "depth"
    c.data.source = "tfds"  # 'tfds' (nyu_depth_v2) | 'folder' (<root>/<split>/{rgb,depth})
    c.data.train_split = "train"
    c.data.eval_split = "validation"  # tfds name of the 654 official test images
    c.data.eval_crop = 480
    c.data.input_size = 0  # the largest multiple of 2 x patch <= 480

    c.probe = dict(
        num_bins=256, num_queries=128, embed_dim=128, num_heads=4, token_stride=16, min_depth=1e-3, max_depth=10.0
    )
    c.loss = dict(silog_weight=1.0, grad_weight=1.0)
    c.train.num_steps = 100_000
    c.train.batch_size = 16
    c.train.lr = 1e-4
    c.train.weight_decay = 1e-5
    return c
