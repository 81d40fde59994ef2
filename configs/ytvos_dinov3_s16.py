"""FlowFeat DINOv3 ViT-S/16 trained on YouTube-VOS (released defaults of recipe.md; a backbone the paper does not test).

Expected: no paper number (DINOv3 postdates FlowFeat); compare with the DINOv2/DINO rows of the same size.
Weights: facebook/dinov3-vits16-pretrain-lvd1689m is gated on the HF hub (accept the licence, then `hf auth login`),
or pass a local save_pretrained directory with --config.model.encoder=<dir>.
Settings: flowfeat_jax.config.ytvos_config (RAFT-sintel 20 iterations, 30-fps frames, alpha 0.1, validation).
Flow: as configs/ytvos_dinov2_s14.py (python tools/export_flow.py --videos /data/youtube-vos-2019 --method raft ...).
Command: python -m flowfeat_jax.main --config configs/ytvos_dinov3_s16.py --workdir runs/ytvos_dinov3_s16 \
    --config.data.records=/data/flow_ytvos_raft
"""

from flowfeat_jax.config import ytvos_config


def get_config():
    return ytvos_config("facebook/dinov3-vits16-pretrain-lvd1689m", "dinov3_vits16")
