"""FlowFeat DINOv2 ViT-L/14 (hooks 5, 11, 17, 23) trained on YouTube-VOS (config of the reference).

Expected: no paper number (the reference ships the config only).
Teacher: RAFT-sintel, 20 iterations, as the released ytvos.yaml (where the paper and the released config differ,
the released config is the default; the paper's SEA-RAFT M is one override away). Flow export, teacher switch and
validation: flowfeat_jax.config.ytvos_config and README "Reproduce the paper".
Command: python -m flowfeat_jax.main --config configs/ytvos_dinov2_l14.py --workdir runs/ytvos_dinov2_l14 \
    --config.data.records=/data/flow_ytvos_raft [--config.eval.davis=/data/DAVIS-2017]
"""

from flowfeat_jax.config import ytvos_config


def get_config():
    return ytvos_config("facebook/dinov2-large", "dinov2_vitl14")
