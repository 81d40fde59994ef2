"""FlowFeat DINOv2 ViT-L/14 (hooks 5, 11, 17, 23) trained on YouTube-VOS (config of the reference; released defaults).

Expected: no paper number (the reference ships the config only).
Flow: tools/export_flow.py --videos <YouTube-VOS root> --out <records> --method searaft --checkpoint <SEA-RAFT-M>
Command: python -m flowfeat_jax.main --config configs/ytvos_dinov2_l14.py --workdir runs/ytvos_dinov2_l14
    --config.data.records=<records>
"""

from flowfeat_jax.config import YTVOS_NUM_VIDEOS, paper_config


def get_config():
    return paper_config("facebook/dinov2-large", "dinov2_vitl14", YTVOS_NUM_VIDEOS, epochs=500)
