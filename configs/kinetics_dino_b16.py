"""FlowFeat DINO ViT-B/16 trained on Kinetics-400 (paper setting; released config/kinetics.yaml).

Expected: paper Tab. 1 row DINO-B16 + FlowFeat-K400.
Settings: flowfeat_jax.config.kinetics_config (alpha 1.0, data.timeflip=False, SEA-RAFT).
Flow (SEA-RAFT M, as the released config/kinetics.yaml):
    python tools/export_flow.py --videos /data/kinetics400 --out /data/flow_k400_searaft --method searaft \
        --checkpoint <SEA-RAFT-M> --device cuda
Command: python -m flowfeat_jax.main --config configs/kinetics_dino_b16.py --workdir runs/kinetics_dino_b16 \
    --config.data.records=/data/flow_k400_searaft
Validation (optional, model selection as the reference): add --config.eval.davis=/data/DAVIS-2017; the best-J&F
checkpoint is kept in <workdir>/best.
"""

from flowfeat_jax.config import kinetics_config


def get_config():
    return kinetics_config("facebook/dino-vitb16", "dino_vitb16")
