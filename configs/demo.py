"""Demo: a small random-init ViT and FlowFeat decoder trained for a short run on CPU (minutes on 2 cores).

Not a paper setting: the encoder is random unless `--config.model.encoder=<HF name or dir>` names weights.
Command: python -m flowfeat_jax.main --config configs/demo.py
"""

from flowfeat_jax.config import base_config


def get_config():
    config = base_config()
    config.model.encoder_arch = "dinov2_vits14"
    config.model.encoder_size.hidden_size = 96
    config.model.encoder_size.num_layers = 4
    config.model.encoder_size.num_heads = 4
    config.model.encoder_size.mlp_dim = 384
    config.model.features = 64
    config.data.source = "synthetic"
    config.data.frame_size = 224
    config.data.flow_size = 112
    config.train.input_size = 112
    config.train.batch_size = 8
    config.train.num_steps = 200
    config.train.lr = 3e-4
    config.train.log_every = 10
    config.train.checkpoint_every = 100
    return config
