"""Print what a FlowFeat checkpoint holds; with --digest, end with a SHA-256 of its parameter and EMA trees.

  python tools/inspect_checkpoint.py runs/demo            # the latest checkpoint of a run
  python tools/inspect_checkpoint.py runs/demo/checkpoints/100 --digest

The digest covers the online and EMA decoder parameters (names, dtypes, shapes, bytes): equal arrays give the same
digest on any machine, so it compares runs (the resume test does).
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flowfeat_jax import cli  # noqa: E402
from flowfeat_jax.inference import resolve_checkpoint  # noqa: E402
from flowfeat_jax.train import checkpoint as ckpt_lib  # noqa: E402


def count(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def inspect(path: str, digest: bool) -> None:
    directory, step = resolve_checkpoint(path)
    checkpointer = ckpt_lib.Checkpointer(directory)
    state, meta = checkpointer.restore_raw(step)
    checkpointer.close()
    config = meta.get("config", {})
    model, train = config.get("model", {}), config.get("train", {})
    encoder = meta.get("encoder", {})
    print(f"checkpoint: {directory / str(step)}")
    print(f"step: {int(state['step'])} of {train.get('num_steps')}")
    print(f"encoder: {encoder.get('source')} (digest {str(encoder.get('digest'))[:16]})")
    print(
        f"model: features {model.get('features')}, hooks {model.get('hooks') or 'default'}, "
        f"dtype {model.get('dtype')}; "
        f"train: batch {train.get('batch_size')}, lr {train.get('lr')}, crops {train.get('input_size')}"
    )
    print(f"parameters: decoder {count(state['params']):,}, EMA {count(state['ema_params']):,}")
    print(f"non-finite steps skipped: {int(state['nonfinite_total'])}")
    if digest:
        print(ckpt_lib.tree_digest({"params": state["params"], "ema_params": state["ema_params"]}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("path", help="a run directory (its latest checkpoint) or checkpoints/<step>")
    parser.add_argument("--digest", action="store_true", help="print the SHA-256 of params + EMA as the last line")
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    return cli.run_guarded(lambda: inspect(args.path, args.digest), prog="inspect_checkpoint", verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
