"""FlowFeat DINOv2 ViT-B/14 trained on Kinetics-400 (paper setting; released defaults of recipe.md).

Expected: paper Tab. 1 row DINOv2-B14 + FlowFeat-K400.
Flow: tools/export_flow.py --videos <Kinetics-400 root> --out <records> --method searaft --checkpoint <SEA-RAFT-M>
Command: python -m flowfeat_jax.main --config configs/kinetics_dinov2_b14.py --workdir runs/kinetics_dinov2_b14
    --config.data.records=<records>
"""

from flowfeat_jax.config import KINETICS_NUM_VIDEOS, paper_config


def get_config():
    return paper_config("facebook/dinov2-base", "dinov2_vitb14", KINETICS_NUM_VIDEOS, epochs=100)
