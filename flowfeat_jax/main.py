r"""Train FlowFeat: `python -m flowfeat_jax.main --config configs/<name>.py [--workdir DIR] [--config.a.b=value]`.

The config is locked, so a misspelled override (`--config.train.batchsize=8`) fails instead of being ignored. The run
resumes from the latest checkpoint in `--workdir` automatically.
"""

from __future__ import annotations

import os
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from flowfeat_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Required. Experiment config file: configs/<name>.py (e.g. configs/demo.py) or any .py with "
    "get_config(); change fields with --config.<group>.<field>=<value>.", lock_config=True
)
cli.hide_default_in_help("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file stem>).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks on errors.")


def default_workdir(config_path: str) -> str:
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Imported after flag parsing, so --help answers without loading JAX.
    from flowfeat_jax.apps.validation import davis_validation
    from flowfeat_jax.train import loop, sharding

    if not _VERBOSE.value:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    sharding.initialize_distributed()
    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)

    def train():
        final = loop.train(config, workdir, validate=davis_validation(config.eval) if config.eval.davis else None)
        print(f"done: {workdir} " + " ".join(f"{k}={v:.4g}" for k, v in final.items()))
        evaluated = pathlib.Path(workdir) / "eval" / f"step_{config.train.num_steps}"
        if (evaluated / "table.md").is_file():  # the final validation: encoder vs FlowFeat on config.eval.davis
            print(f"DAVIS J&F at step {config.train.num_steps} ({config.eval.davis}, split {config.eval.split}):")
            print((evaluated / "table.md").read_text().rstrip())
            print("pictures (frame | encoder PCA | FlowFeat PCA): " +
                  " ".join(str(p) for p in sorted((evaluated / "pca").glob("*.png"))))

    status = cli.run_guarded(train, prog="flowfeat_jax.main", verbose=_VERBOSE.value)
    if status and not _VERBOSE.value:
        cli.silence_stderr_at_exit()  # the error line is out; what leftover save threads print on exit is noise
    return status


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=cli.absl_flags_parser("flowfeat_jax.main"))
