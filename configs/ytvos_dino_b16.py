"""FlowFeat DINO ViT-B/16 trained on YouTube-VOS (paper setting; released config/ytvos.yaml).

Expected: paper Tab. 1 row DINO-B16 + FlowFeat-YT.
Settings: flowfeat_jax.config.ytvos_config (teacher, frames, alpha, validation; why RAFT is the default).
Flow (released teacher, RAFT-sintel 20 iterations; 30-fps `train_all_frames` of a YouTube-VOS 2019 root):
    python tools/export_flow.py --videos /data/youtube-vos-2019 --out /data/flow_ytvos_raft --method raft \
        --checkpoint raft-sintel.pth --iters 20 --device cuda
  The paper's SEA-RAFT M: --method searaft --checkpoint <SEA-RAFT-M> --out /data/flow_ytvos_searaft, then train with
  --config.data.method=searaft --config.data.iters=0. The 6-fps frames only when asked: --videos <root>:train.
Command: python -m flowfeat_jax.main --config configs/ytvos_dino_b16.py --workdir runs/ytvos_dino_b16 \
    --config.data.records=/data/flow_ytvos_raft
Validation (optional, model selection as the reference): add --config.eval.davis=/data/DAVIS-2017; the best-J&F
checkpoint is kept in <workdir>/best.
"""

from flowfeat_jax.config import ytvos_config


def get_config():
    return ytvos_config("facebook/dino-vitb16", "dino_vitb16")
