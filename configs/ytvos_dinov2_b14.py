"""FlowFeat DINOv2 ViT-B/14 trained on YouTube-VOS (paper setting; released defaults of recipe.md).

Expected: paper Tab. 1 row DINOv2-B14 + FlowFeat-YT.
Flow: tools/export_flow.py --videos <YouTube-VOS root> --out <records> --method searaft --checkpoint <SEA-RAFT-M>
Command: python -m flowfeat_jax.main --config configs/ytvos_dinov2_b14.py --workdir runs/ytvos_dinov2_b14
    --config.data.records=<records>
"""

from flowfeat_jax.config import YTVOS_NUM_VIDEOS, paper_config


def get_config():
    return paper_config("facebook/dinov2-base", "dinov2_vitb14", YTVOS_NUM_VIDEOS, epochs=500)
