"""In-training DAVIS validation, handed to `train.loop.train` as its callback by the apps (main, experiment).

The train loop never imports eval/: it calls what it is given (layers: train / eval side by side, apps above).
"""

from __future__ import annotations

import pathlib

import ml_collections

from flowfeat_jax.eval import features
from flowfeat_jax.models.flowfeat import FlowFeat

SCORE_PREFIXES = {"flowfeat": "eval", "encoder": "eval/encoder"}


def davis_validation(eval_cfg: ml_collections.ConfigDict):
    """validate(model, out_dir, kinds) -> {"eval/<protocol>/<score>": value} for the FlowFeat row, plus
    {"eval/encoder/<protocol>/<score>": value} when `kinds` has "encoder", on `eval.davis` (its split, sequences,
    protocols, short side and frame limit); the table of every row goes to `out_dir/table.md`."""

    def validate(model: FlowFeat, out_dir: pathlib.Path, kinds: tuple[str, ...] = ("flowfeat",)) -> dict[str, float]:
        results = features.evaluate_davis(
            model,
            eval_cfg.davis,
            out_dir,
            split=eval_cfg.split,
            sequences=[s for s in eval_cfg.sequences.split(",") if s],
            protocols=[p for p in eval_cfg.protocols.split(",") if p],
            feature_kinds=kinds,
            short_side=eval_cfg.short_side,
            max_frames=eval_cfg.max_frames or None,
        )
        (pathlib.Path(out_dir) / "table.md").write_text(features.results_table(results) + "\n")
        return {f"{SCORE_PREFIXES[kind]}/{p}/{k}": v for kind, by_protocol in results.items()
                for p, scores in by_protocol.items() for k, v in scores.items()}

    return validate
