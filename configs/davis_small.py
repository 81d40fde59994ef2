"""A small FlowFeat trained on the 9 DAVIS-2016 train sequences, sized for two CPU cores.

Data: DAVIS-2016 `ImageSets/train.txt` (boat, dog-agility, drift-turn, hockey, motorbike, rollerblade, surf, swing,
tennis; 502 frames). OpenCV DIS flow is exported into <workdir>/flow on the first run (about a minute). The root
defaults to `../shared/data/davis2016` beside the repository; give another one after the file name:
`--config configs/davis_small.py:/data/davis2016`.
Model: a random-init DINOv2-style ViT (patch 14, width 96, 4 blocks) unless `--config.model.encoder=<HF name or dir>`
names weights (no weights can be downloaded on the machines this was made for), and a d = 64 DPT decoder.
Deviations from the released recipe (recipe.md), all for the CPU budget: 224 frames, 112 flow and 112 crops (released
448 / 224 / 224), batch 8 (128), 600 steps, and lr 3e-4 (1e-4) so that so few steps move the decoder visibly. The
loss (L_grad + 0.1 L_L1, sigma 0.1), ridge alpha 0.1, crop scales, AdamW betas and the EMA schedule are released.
No validation during training: tools/experiment_davis.py evaluates the run (eval.short_side, eval.max_frames).
Measured on 2 shared cores (load 3-8 from other jobs): 2.1-4.3 img/s, so 600 steps took ~35 min; about 10 img/s
(~8 min) on idle cores. Evaluation of 3 feature kinds x 2 protocols x 11 sequences: ~13 min.
Command: python tools/experiment_davis.py --config configs/davis_small.py --workdir runs/davis_small --out DIR
    (training only: python -m flowfeat_jax.main --config configs/davis_small.py --workdir runs/davis_small)
"""

import pathlib

from flowfeat_jax.config import cpu_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DAVIS = REPO.parent / "shared" / "data" / "davis2016"


def get_config(davis_root: str | None = None):
    root = pathlib.Path(davis_root) if davis_root else DEFAULT_DAVIS
    if not root.is_absolute():
        root = REPO / root
    config = cpu_config()
    config.data.videos = f"{root}:train"
    config.train.num_steps = 600
    config.train.log_every = 20
    config.train.checkpoint_every = 100
    config.train.keep_checkpoints = 10  # every 100 steps, to follow the scores over training
    config.eval.davis = ""  # no validation while training; the experiment evaluates on `root`'s val split
    config.eval.max_frames = 30  # first 30 frames per val sequence (28 scored)
    return config
