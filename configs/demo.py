"""Demo: flow, a short training run, a checkpoint, a DAVIS-style score and a feature picture, in minutes on a CPU.

Data: the bundled 16-frame DAVIS clip (flowfeat_jax/assets/demo_clip, see its README for the licence). OpenCV DIS
flow is exported into <workdir>/flow on the first run. The encoder is a small random-init ViT (4 blocks, width 96,
patch 14) unless `--config.model.encoder=<HF name or dir>` names weights; the decoder has d = 64. Not a paper setting:
the score only shows that the pipeline runs end to end, and on random encoder features the numbers mean little.
Command: python -m flowfeat_jax.main --config configs/demo.py
"""

import pathlib

import flowfeat_jax
from flowfeat_jax.config import cpu_config

DEMO_CLIP = pathlib.Path(flowfeat_jax.__file__).parent / "assets" / "demo_clip"


def get_config():
    config = cpu_config()
    config.data.videos = f"{DEMO_CLIP}:demo"
    config.train.num_steps = 150
    config.train.log_every = 10
    config.train.checkpoint_every = 50
    config.eval.davis = str(DEMO_CLIP)
    config.eval.split = "demo"
    return config
