"""FlowFeat MAE ViT-B/16 trained on Kinetics-400 (paper setting; released defaults of recipe.md).

Expected: paper Tab. 1 row MAE-B16 + FlowFeat-K400.
Flow: tools/export_flow.py --videos <Kinetics-400 root> --out <records> --method searaft --checkpoint <SEA-RAFT-M>
Command: python -m flowfeat_jax.main --config configs/kinetics_mae_b16.py --workdir runs/kinetics_mae_b16
    --config.data.records=<records>
"""

from flowfeat_jax.config import KINETICS_NUM_VIDEOS, paper_config


def get_config():
    return paper_config("facebook/vit-mae-base", "mae_vitb16", KINETICS_NUM_VIDEOS, epochs=100)
