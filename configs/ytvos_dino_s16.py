"""FlowFeat DINO ViT-S/16 trained on YouTube-VOS (paper setting; released defaults of recipe.md).

Expected: paper Tab. 1 row DINO-S16 + FlowFeat-YT.
Flow: tools/export_flow.py --videos <YouTube-VOS root> --out <records> --method searaft --checkpoint <SEA-RAFT-M>
Command: python -m flowfeat_jax.main --config configs/ytvos_dino_s16.py --workdir runs/ytvos_dino_s16
    --config.data.records=<records>
"""

from flowfeat_jax.config import YTVOS_NUM_VIDEOS, paper_config


def get_config():
    return paper_config("facebook/dino-vits16", "dino_vits16", YTVOS_NUM_VIDEOS, epochs=500)
