"""FlowFeat DINOv2 ViT-L/14 (hooks 5, 11, 17, 23) trained on YouTube-VOS (paper setting; released defaults of recipe.md).

Expected: no paper number (the reference ships the config only).
Flow: tools/export_flow.py --videos <YouTube-VOS root> --out <records> --method searaft --checkpoint <SEA-RAFT M weights>
Command: python -m flowfeat_jax.main --config configs/ytvos_dinov2_l14.py --workdir runs/ytvos_dinov2_l14 --config.data.records=<records>
"""

from flowfeat_jax.config import YTVOS_NUM_VIDEOS, base_config, steps_for


def get_config():
    config = base_config()
    config.model.encoder = "facebook/dinov2-large"
    config.model.encoder_arch = "dinov2_vitl14"
    config.train.num_steps = steps_for(YTVOS_NUM_VIDEOS, 500, config.train.batch_size)
    return config
