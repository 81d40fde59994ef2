r"""Dense probes on frozen features: `python -m flowfeat_jax.probe --config configs/probe_cocostuff.py [--workdir DIR]`.

Also `--config configs/probe_nyu.py`. Override any field with `--config.a.b=value` (the config is locked, so a
misspelled field fails). The run resumes from the latest probe checkpoint in `--workdir` and writes `metrics.json`
and `pictures/` there.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from flowfeat_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Required. Probe config file: configs/probe_cocostuff.py or configs/probe_nyu.py; change fields "
    "with --config.<group>.<field>=<value>.", lock_config=True
)
cli.hide_default_in_help("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file stem>).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks on errors.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from flowfeat_jax.probes import run as run_lib  # after flag parsing: --help answers without loading JAX

    if not _VERBOSE.value:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    config_path = flags.FLAGS["config"].config_filename
    workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])

    def probe():
        metrics = run_lib.run(config, workdir)
        print(f"done: {workdir} {run_lib.summary(metrics)}")

    return cli.run_guarded(probe, prog="flowfeat_jax.probe", verbose=_VERBOSE.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")

    app.run(main, flags_parser=cli.absl_flags_parser("flowfeat_jax.probe"))
