r"""COCO-Stuff-27 semantic segmentation probe (FlowFeat paper, semantic segmentation; FlowFeat++ = with PAMR).

Attention probe (27 class queries, one cross-attention block) on frozen features of a trained FlowFeat run, trained
on COCO-Stuff train2017 and scored (mIoU, pixel accuracy; 255 ignored) on val2017 at 448 x 448 (short side resized
to 448, centre crop; labels nearest). PAMR (10 iterations, 11 x 11 neighbourhood, FlowFeat affinities) is reported
as `miou_pamr` beside the plain probe. `data.train_list` / `data.eval_list` select the curated PiCIE/STEGO subsets.
Steps, batch and lr are our choices (the paper does not list them).

Command:
  python -m flowfeat_jax.probe --config configs/probe_cocostuff.py \
      --config.features.run_dir=runs/ytvos_dinov2_s14 --config.data.root=/data/cocostuff
Encoder-only baseline: --config.features.which=encoder --config.model.encoder=facebook/dinov2-small \
      --config.pamr.enabled=False      (PAMR needs the FlowFeat features of a trained run for its affinities)
"""

from flowfeat_jax.probes.config import base_probe_config


def get_config():
    c = base_probe_config()
    c.task = "segmentation"
    c.data.root = ""  # images/<split>/*.jpg + stuffthingmaps_trainval2017/<split>/*.png
    c.data.train_split = "train2017"
    c.data.eval_split = "val2017"
    c.data.num_classes = 27
    c.data.input_size = 448

    c.probe = dict(num_heads=8, with_norm=False, downscale=1)  # reference probes/attention.py defaults

    c.pamr.enabled = True
    c.pamr.dilations = (1, 2, 3, 4, 5)  # 11 x 11 span; PAMR's original: (1, 2, 4, 8, 12, 24)
    c.pamr.num_iter = 10
    return c
