"""configs/davis_small.py sized for one GPU: the released 448 / 224 / 224 sizes and d = 128, batch 32, 3000 steps.

Same data (DAVIS-2016 train, DIS flow exported into <workdir>/flow) and the same loss, ridge, optimiser and EMA
settings; the encoder is still a random-init ViT-S/14 shape unless `--config.model.encoder=facebook/dinov2-small`
(or a local dir) names weights. Evaluation at the paper's 480 short side.
Command: python tools/experiment_davis.py --config configs/davis_small_gpu.py --workdir runs/davis_small_gpu
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("davis_small", pathlib.Path(__file__).with_name("davis_small.py"))
davis_small = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(davis_small)


def get_config(davis_root: str | None = None):
    config = davis_small.get_config(davis_root)
    config.model.encoder_size.hidden_size = 0  # the full dinov2_vits14 preset: width 384, 12 blocks, 6 heads
    config.model.encoder_size.num_layers = 0
    config.model.encoder_size.num_heads = 0
    config.model.encoder_size.mlp_dim = 0
    config.model.features = 128
    config.data.frame_size = 448
    config.data.flow_size = 224
    config.data.num_workers = 4
    config.train.input_size = 224
    config.train.batch_size = 32
    config.train.num_steps = 3000
    config.train.checkpoint_every = 1000
    config.eval.short_side = 480
    return config
