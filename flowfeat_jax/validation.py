"""In-training DAVIS validation, handed to `train.loop.train` as its callback by the apps (main, experiment).

The train loop never imports eval/: it calls what it is given (layers: train / eval side by side, apps above).
"""

from __future__ import annotations

import pathlib

import ml_collections

from flowfeat_jax.models.flowfeat import FlowFeat


def davis_validation(eval_cfg: ml_collections.ConfigDict):
    """validate(model, out_dir) -> {"eval/<protocol>/<score>": value}: the FlowFeat rows of `eval.protocols` on
    `eval.davis` (its split, sequences, short side and frame limit)."""

    def validate(model: FlowFeat, out_dir: pathlib.Path) -> dict[str, float]:
        from flowfeat_jax.eval import features

        results = features.evaluate_davis(
            model,
            eval_cfg.davis,
            out_dir,
            split=eval_cfg.split,
            sequences=[s for s in eval_cfg.sequences.split(",") if s],
            protocols=[p for p in eval_cfg.protocols.split(",") if p],
            short_side=eval_cfg.short_side,
            max_frames=eval_cfg.max_frames or None,
        )
        return {f"eval/{p}/{k}": v for p, scores in results["flowfeat"].items() for k, v in scores.items()}

    return validate
