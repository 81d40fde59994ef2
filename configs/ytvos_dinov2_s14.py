"""FlowFeat DINOv2 ViT-S/14 trained on YouTube-VOS (paper setting; released config/ytvos.yaml).

Expected: DAVIS-2017 val linear-probe J&F 65.8, KNN 67.6 (paper Tab. 1, DINOv2-S14 + FlowFeat-YT; the encoder
alone: 57.5 / 65.1).
Settings: flowfeat_jax.config.ytvos_config (teacher, frames, alpha, validation; why RAFT is the default).
Flow (released teacher, RAFT-sintel 20 iterations; 30-fps `train_all_frames` of a YouTube-VOS 2019 root):
    python tools/export_flow.py --videos /data/youtube-vos-2019 --out /data/flow_ytvos_raft --method raft \
        --checkpoint raft-sintel.pth --iters 20 --device cuda
  The paper's SEA-RAFT M: --method searaft --checkpoint <SEA-RAFT-M> --out /data/flow_ytvos_searaft, then train with
  --config.data.method=searaft --config.data.iters=0. The 6-fps frames only when asked: --videos <root>:train.
Command: python -m flowfeat_jax.main --config configs/ytvos_dinov2_s14.py --workdir runs/ytvos_dinov2_s14 \
    --config.data.records=/data/flow_ytvos_raft
Validation (optional, model selection as the reference): add --config.eval.davis=/data/DAVIS-2017; the best-J&F
checkpoint is kept in <workdir>/best.
"""

from flowfeat_jax.config import ytvos_config


def get_config():
    return ytvos_config("facebook/dinov2-small", "dinov2_vits14")
