r"""NYUv2 monocular depth probe (FlowFeat paper, depth estimation): AdaBins-style head with 256 adaptive bins.

Frozen features of a trained FlowFeat run; trained with the scale-invariant log loss + a gradient loss on NYUv2
train; scored on the 654 test images at 480 x 480 (centre square of the 480 x 640 frame, Eigen crop, valid depth in
(1e-3, 10) m): RMSE, AbsRel, delta1..3. The network sees the 480 x 480 crop resized to 448 x 448 (a multiple of
2 x patch for p14 and p16); predictions are resized back to 480 x 480. Steps, batch and lr are our choices.

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
    c.data.input_size = 448
    c.data.eval_crop = 480

    c.probe = dict(
        num_bins=256, num_queries=128, embed_dim=128, num_heads=4, token_stride=16, min_depth=1e-3, max_depth=10.0
    )
    c.loss = dict(silog_weight=1.0, grad_weight=1.0)
    c.train.lr = 3e-4
    return c
