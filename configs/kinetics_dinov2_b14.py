"""FlowFeat DINOv2 ViT-B/14 trained on Kinetics-400 (paper setting; released defaults of recipe.md).

Expected: paper Tab. 1 row DINOv2-B14 + FlowFeat-K400.
Flow: tools/export_flow.py --videos <Kinetics-400 root> --out <records> --method searaft --checkpoint <SEA-RAFT M weights>
Command: python -m flowfeat_jax.main --config configs/kinetics_dinov2_b14.py --workdir runs/kinetics_dinov2_b14 --config.data.records=<records>
"""

from flowfeat_jax.config import KINETICS_NUM_VIDEOS, base_config, steps_for


def get_config():
    config = base_config()
    config.model.encoder = "facebook/dinov2-base"
    config.model.encoder_arch = "dinov2_vitb14"
    config.train.num_steps = steps_for(KINETICS_NUM_VIDEOS, 100, config.train.batch_size)
    return config
