r"""COCO-Stuff-27 semantic segmentation probe (FlowFeat paper, semantic segmentation; FlowFeat++ = with PAMR).

Paper settings (recipe.md "Evaluation"): attention probe (27 class queries, one cross-attention block, dot product)
on frozen features of a trained FlowFeat run, 256 x 256 centre crops (short side resized, labels nearest), Adam lr
1e-4 with weight decay 1e-3, batch 32, 100k steps; scored (mIoU, pixel accuracy; 255 ignored) on val2017 crops.
The network sees the crop at the largest multiple of 2 x patch <= 256 (256 for patch 16, 252 for patch 14; logits
are resized back to 256). FlowFeat++ (`miou_pamr`, beside the plain probe): PAMR with one dense 11 x 11 kernel,
fixed scaling factor 0.1, 10 steps, FlowFeat affinities; the dilated-ring variant is `--config.pamr.kernel=rings`.
Key/value downsampling: the paper pools the FlowFeat maps inside the cross-attention "for speed" without a factor;
we pool by 4 (256 -> 64 x 64 = 4096 keys, still 16 x the patch-16 token grid): the keys only form 27 attended
query vectors, while every pixel's logit keeps its full-resolution feature. `--config.probe.downscale=1` attends
to every pixel (the reference code's default). `data.train_list` / `data.eval_list` select the curated PiCIE/STEGO
subsets.

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
    c.data.eval_crop = 256
    c.data.input_size = 0  # the largest multiple of 2 x patch <= 256

    c.probe = dict(num_heads=8, with_norm=False, downscale=4)  # reference probes/attention.py, keys pooled by 4

    c.train.num_steps = 100_000
    c.train.batch_size = 32
    c.train.lr = 1e-4
    c.train.weight_decay = 1e-3

    c.pamr.enabled = True
    c.pamr.kernel = "dense"
    c.pamr.size = 11
    c.pamr.scale = 0.1
    c.pamr.num_iter = 10
    return c
