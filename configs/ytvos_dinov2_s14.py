"""FlowFeat DINOv2 ViT-S/14 trained on YouTube-VOS (paper setting; released defaults of recipe.md).

Expected: DAVIS-2017 val linear-probe J&F 65.8, KNN 67.6 (paper, DINOv2-S14 FlowFeat-YT).
Flow: tools/export_flow.py --videos <YouTube-VOS root> --out <records> --method searaft --checkpoint <SEA-RAFT-M>
Command: python -m flowfeat_jax.main --config configs/ytvos_dinov2_s14.py --workdir runs/ytvos_dinov2_s14
    --config.data.records=<records>
"""

from flowfeat_jax.config import YTVOS_NUM_VIDEOS, paper_config


def get_config():
    return paper_config("facebook/dinov2-small", "dinov2_vits14", YTVOS_NUM_VIDEOS, epochs=500)
