"""FlowFeat MAE ViT-B/16 trained on Kinetics-400 (paper setting; released defaults of recipe.md).

Expected: paper Tab. 1 row MAE-B16 + FlowFeat-K400.
Flow: tools/export_flow.py --videos <Kinetics-400 root> --out <records> --method searaft --checkpoint <SEA-RAFT M weights>
Command: python -m flowfeat_jax.main --config configs/kinetics_mae_b16.py --workdir runs/kinetics_mae_b16 --config.data.records=<records>
"""

from flowfeat_jax.config import KINETICS_NUM_VIDEOS, base_config, steps_for


def get_config():
    config = base_config()
    config.model.encoder = "facebook/vit-mae-base"
    config.model.encoder_arch = "mae_vitb16"
    config.train.num_steps = steps_for(KINETICS_NUM_VIDEOS, 100, config.train.batch_size)
    return config
