"""The Tab. 3 ablation sweep at CPU scale: configs/davis_small.py with shorter runs and shorter evaluation.

Each of the 7 settings x 3 seeds of `tools/experiment_davis.py --ablations all` trains this config (the ablation's
overrides on top), so a run is cut to 150 steps (davis_small: 600) and each evaluation to the first 12 frames of the
11 DAVIS-2016 val sequences (davis_small: 30) to keep the whole sweep near 1.5 h on two CPU cores.
Command: python tools/experiment_davis.py --config configs/davis_ablations.py --ablations all --seeds 0,1,2
    --workdir runs/ablations --out docs/results/ablations
(the same sweep at GPU sizes: --config configs/davis_small_gpu.py)
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("davis_small", pathlib.Path(__file__).with_name("davis_small.py"))
davis_small = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(davis_small)


def get_config(davis_root: str | None = None):
    config = davis_small.get_config(davis_root)
    config.train.num_steps = 150
    config.train.log_every = 10
    config.train.checkpoint_every = 50
    config.train.keep_checkpoints = 1
    config.eval.max_frames = 12
    return config
