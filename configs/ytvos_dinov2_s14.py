"""FlowFeat DINOv2 ViT-S/14 trained on YouTube-VOS (paper setting; released config/ytvos.yaml).

Expected: DAVIS-2017 val linear-probe J&F 65.8, KNN 67.6 (paper Tab. 1, DINOv2-S14 + FlowFeat-YT; the encoder
alone: 57.5 / 65.1).
Teacher: RAFT-sintel, 20 iterations, as the released ytvos.yaml (where the paper and the released config differ,
the released config is the default; the paper's SEA-RAFT M is one override away). Flow export, teacher switch and
validation: flowfeat_jax.config.ytvos_config and README "Reproduce the paper".
Command: python -m flowfeat_jax.main --config configs/ytvos_dinov2_s14.py --workdir runs/ytvos_dinov2_s14 \
    --config.data.records=/data/flow_ytvos_raft [--config.eval.davis=/data/DAVIS-2017]
"""

from flowfeat_jax.config import ytvos_config


def get_config():
    return ytvos_config("facebook/dinov2-small", "dinov2_vits14")
