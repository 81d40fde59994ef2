"""FlowFeat DINOv3 ViT-B/16 trained on YouTube-VOS (released defaults of recipe.md; a backbone the paper does not test).

Expected: no paper number (DINOv3 postdates FlowFeat); compare with the DINOv2/DINO rows of the same size.
Weights: facebook/dinov3-vitb16-pretrain-lvd1689m is gated on the HF hub (accept the licence, then `hf auth login`),
or pass a local save_pretrained directory with --config.model.encoder=<dir>.
Flow: tools/export_flow.py --videos <YouTube-VOS root> --out <records> --method searaft --checkpoint <SEA-RAFT-M>
Command: python -m flowfeat_jax.main --config configs/ytvos_dinov3_b16.py --workdir runs/ytvos_dinov3_b16
    --config.data.records=<records>
"""

from flowfeat_jax.config import YTVOS_NUM_VIDEOS, paper_config


def get_config():
    return paper_config("facebook/dinov3-vitb16-pretrain-lvd1689m", "dinov3_vitb16", YTVOS_NUM_VIDEOS, epochs=500)
