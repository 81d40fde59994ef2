r"""DAVIS evaluation of encoder and FlowFeat features: label propagation (knn) and the linear probe.

  python -m flowfeat_jax.evaluate --workdir runs/demo --davis ../shared/data/davis2016 --protocols knn,linear

`--workdir` is a run (or imported) directory with a checkpoint; its online decoder is evaluated (as the reference
validates and releases it; `--decoder ema` for the teacher). Instead of a
checkpoint, `--config` builds the model it names (its encoder, a random decoder): encoder-only baselines and the
untrained-decoder baseline need no training. Writes `<out>/<features>/<protocol>/` (result PNGs, overlays,
SCORES.json, scores.csv), `<out>/pca/` and `<out>/table.md` + `<out>/table.csv`, and prints the table.
"""

from __future__ import annotations

import csv
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from flowfeat_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with a checkpoint (or one checkpoints/<step> folder).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional, instead of --workdir: a config file (configs/<name>.py) whose model (its encoder, an "
    "untrained decoder) is evaluated."
)
cli.hide_default_in_help("config")
_DAVIS = flags.DEFINE_string("davis", None, "DAVIS root (JPEGImages/480p, Annotations/480p, ImageSets).")
_SPLIT = flags.DEFINE_string("split", "val", "Sequence list ImageSets/<split>.txt.")
_SEQUENCES = flags.DEFINE_list("sequences", [], "Subset of the split's sequences.")
_PROTOCOLS = flags.DEFINE_list("protocols", ["knn", "linear"], "knn and/or linear.")
_FEATURES = flags.DEFINE_list("features", ["encoder", "flowfeat"], "encoder and/or flowfeat.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval_davis).")
_SHORT_SIDE = flags.DEFINE_integer("short_side", 480, "Input short side (rounded down to an even token grid).")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 0, "Truncate sequences (0 = all frames).")
_DECODER = flags.DEFINE_enum("decoder", "online", ["online", "ema"], "Which decoder of the checkpoint (the reference "
                             "evaluates the online one).")
_KNN_STREAMS = flags.DEFINE_enum("knn_streams", "both", ["both", "flowfeat"], "KNN of flowfeat rows: both = encoder + "
                                 "pooled FlowFeat streams averaged (supp. B.1); flowfeat = pooled FlowFeat alone.")
_KNN_SCALE = flags.DEFINE_enum("knn_scale", "1", ["1", "2"], "KNN grid: 1 = encoder patch grid; 2 = 2x finer (Tab. 6).")
_PROBE_ENCODER_GRID = flags.DEFINE_enum("probe_encoder_grid", "patch", ["patch", "input"], "Encoder-only linear "
                                        "probe on the patch grid (paper) or on upsampled features at the input size.")
_FRAMES_PER_CALL = flags.DEFINE_integer("frames_per_call", 0, "Frames per compiled chunk (memory vs. dispatches); "
                                        "0: 1 on CPU, 4 on accelerators.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks on errors.")


def write_table_csv(results: dict, path: pathlib.Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["features", "protocol", "JF_mean", "J_mean", "F_mean"])
        for kind, by_protocol in results.items():
            for protocol, s in by_protocol.items():
                writer.writerow([kind, protocol, s["JF_mean"], s["J_mean"], s["F_mean"]])


def run() -> pathlib.Path:
    # Imported here, not at the top: `--help` answers without loading JAX and the model code.
    from flowfeat_jax import config as config_lib
    from flowfeat_jax.eval import features
    from flowfeat_jax.eval.knn import KnnSettings
    from flowfeat_jax.eval.linear_probe import ProbeSettings
    from flowfeat_jax.inference import load_flowfeat
    from flowfeat_jax.ports.build import build_flowfeat

    if not _DAVIS.value:
        raise ValueError("--davis is required: the DAVIS root to evaluate on")
    if _FRAMES_PER_CALL.value < 0:
        raise ValueError(f"--frames_per_call must be >= 0 (0: automatic), got {_FRAMES_PER_CALL.value}")
    if _CONFIG.value is not None and not _WORKDIR.value:
        config_lib.validate_config(_CONFIG.value)
        model, source = build_flowfeat(_CONFIG.value.model, _CONFIG.value.seed)
        logging.info("evaluating an untrained decoder on %s", source)
    elif _WORKDIR.value:
        model, _, step = load_flowfeat(_WORKDIR.value, decoder=_DECODER.value)
        logging.info("evaluating %s at step %d", _WORKDIR.value, step)
    else:
        raise ValueError("give --workdir (a run with a checkpoint) or --config (a model without training)")
    patch = model.cfg.encoder.patch_size
    config_lib.check_evaluate_flags(_PROTOCOLS.value, _SHORT_SIDE.value, _MAX_FRAMES.value, patch)  # before any output
    out = pathlib.Path(_OUT.value or pathlib.Path(_WORKDIR.value or ".") / "eval_davis")
    results = features.evaluate_davis(
        model,
        _DAVIS.value,
        out,
        split=_SPLIT.value,
        sequences=_SEQUENCES.value or None,
        protocols=_PROTOCOLS.value,
        feature_kinds=_FEATURES.value,
        short_side=_SHORT_SIDE.value,
        max_frames=_MAX_FRAMES.value or None,
        knn_settings=KnnSettings(streams=_KNN_STREAMS.value, scale=int(_KNN_SCALE.value)),
        probe_settings=ProbeSettings(encoder_grid=_PROBE_ENCODER_GRID.value),
        frames_per_call=_FRAMES_PER_CALL.value or None,
    )
    table = features.results_table(results)
    (out / "table.md").write_text(table + "\n")
    write_table_csv(results, out / "table.csv")
    print(table)
    return out


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    if not _VERBOSE.value:
        logging.set_verbosity(logging.WARNING)
    return cli.run_guarded(run, prog="flowfeat_jax.evaluate", verbose=_VERBOSE.value)


if __name__ == "__main__":

    app.run(main, flags_parser=cli.absl_flags_parser("flowfeat_jax.evaluate"))
