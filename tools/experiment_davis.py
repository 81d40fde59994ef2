r"""Export -> train -> evaluate on DAVIS: encoder features vs the untrained decoder vs trained FlowFeat, or the
paper's Tab. 3 ablations over seeds.

  python tools/experiment_davis.py --config configs/davis_small.py --workdir runs/davis_small --out docs/results
  python tools/experiment_davis.py --config configs/davis_ablations.py --ablations all --seeds 0,1,2 \
      --workdir runs/ablations --out docs/results/ablations

Trains (or resumes, or reuses a finished run in --workdir) the config, then scores label propagation (knn) and the
linear probe on the DAVIS val split for the encoder features, the same seed's untrained decoder and the trained EMA
decoder. The DAVIS root defaults to the folder of `config.data.videos` (`PATH:train` -> PATH); the evaluation size and
frame cap are `config.eval.short_side` / `config.eval.max_frames`, the sequences `config.eval.sequences` ('' = the
whole split). Writes table.md, table.csv, results.json, bar_chart.png, pca.png, loss.png into --out (library:
flowfeat_jax.apps.experiment.run_experiment).
With --ablations (names of flowfeat_jax.apps.experiment.ABLATIONS, or `all`) every ablation x seed is trained in
<workdir>/<ablation>/seed<k> (resumable per run; finished runs and their scores are reused), and ablations.md / .csv /
.json / .png are written into --out (library: run_ablation_sweep). `--config configs/davis_small_gpu.py` is the
same sweep at the GPU sizes.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clean clone without installing

from flowfeat_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Required. Experiment config file (configs/davis_small.py).", lock_config=True
)
cli.hide_default_in_help("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file stem>).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the table and pictures (default: <workdir>/experiment).")
_DAVIS = flags.DEFINE_string("davis", None, "DAVIS root to evaluate on (default: the root of config.data.videos).")
_SPLIT = flags.DEFINE_string("split", "val", "Evaluation sequences: ImageSets/<split>.txt.")
_PROTOCOLS = flags.DEFINE_list("protocols", ["knn", "linear"], "knn and/or linear.")
_ABLATIONS = flags.DEFINE_list(
    "ablations", [], "Run the Tab. 3 sweep over these ablations ('all' = every one; 'full' is always included)."
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the ablation sweep.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks on errors.")


def run() -> None:
    from flowfeat_jax.apps import experiment

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", pathlib.Path(flags.FLAGS["config"].config_filename).stem)
    workdir = workdir.split(":")[0]
    davis_root = _DAVIS.value or experiment.davis_root_of(config.data.videos)
    if not davis_root:
        raise ValueError("--davis is required when config.data.videos is empty")
    if not pathlib.Path(davis_root).is_dir():
        raise FileNotFoundError(f"{davis_root}: no such DAVIS root (give --davis)")
    sequences = [s for s in config.eval.sequences.split(",") if s] or None
    if _ABLATIONS.value:
        names = list(experiment.ABLATIONS) if _ABLATIONS.value == ["all"] else ["full"] + [
            n for n in _ABLATIONS.value if n != "full"]
        unknown = [n for n in names if n not in experiment.ABLATIONS]
        if unknown:
            raise ValueError(f"--ablations: unknown {', '.join(unknown)}; known: all, {', '.join(experiment.ABLATIONS)}")
        try:
            seeds = [int(s) for s in _SEEDS.value]
        except ValueError:
            raise ValueError(f"--seeds: integers expected, got {','.join(_SEEDS.value)}") from None
        out = pathlib.Path(_OUT.value or pathlib.Path(workdir) / "ablations")
        facts = experiment.run_ablation_sweep(
            config, workdir, out, davis_root, ablations=names, seeds=seeds, split=_SPLIT.value,
            sequences=sequences, protocols=_PROTOCOLS.value,
        )
        print(facts["caption"] + "\n\n" + experiment.sweep_markdown(facts["summary"], _PROTOCOLS.value))
        print(f"written: {out}")
        return
    out = pathlib.Path(_OUT.value or pathlib.Path(workdir) / "experiment")
    results = experiment.run_experiment(
        config,
        workdir,
        out,
        davis_root,
        split=_SPLIT.value,
        sequences=sequences,
        protocols=_PROTOCOLS.value,
    )
    print(experiment.results_markdown(results))
    print(f"written: {out}")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    if not _VERBOSE.value:
        logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return cli.run_guarded(run, prog="experiment_davis", verbose=_VERBOSE.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
