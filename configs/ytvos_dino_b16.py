"""FlowFeat DINO ViT-B/16 trained on YouTube-VOS (paper setting; released config/ytvos.yaml).

Expected: paper Tab. 1 row DINO-B16 + FlowFeat-YT.
Teacher: RAFT-sintel, 20 iterations, as the released ytvos.yaml (where the paper and the released config differ,
the released config is the default; the paper's SEA-RAFT M is one override away). Flow export, teacher switch and
validation: flowfeat_jax.config.ytvos_config and README "Reproduce the paper".
Command: python -m flowfeat_jax.main --config configs/ytvos_dino_b16.py --workdir runs/ytvos_dino_b16 \
    --config.data.records=/data/flow_ytvos_raft [--config.eval.davis=/data/DAVIS-2017]
"""

from flowfeat_jax.config import ytvos_config


def get_config():
    return ytvos_config("facebook/dino-vitb16", "dino_vitb16")
