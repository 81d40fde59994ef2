"""FlowFeat DINO ViT-B/16 trained on YouTube-VOS (paper setting; released defaults of recipe.md).

Expected: paper Tab. 1 row DINO-B16 + FlowFeat-YT.
Flow: tools/export_flow.py --videos <YouTube-VOS root> --out <records> --method searaft --checkpoint <SEA-RAFT-M>
Command: python -m flowfeat_jax.main --config configs/ytvos_dino_b16.py --workdir runs/ytvos_dino_b16
    --config.data.records=<records>
"""

from flowfeat_jax.config import YTVOS_NUM_VIDEOS, paper_config


def get_config():
    return paper_config("facebook/dino-vitb16", "dino_vitb16", YTVOS_NUM_VIDEOS, epochs=500)
