"""One-call GPU check of FlowFeat (issue 17): train step JAX f32/bf16 vs torch fp32/bf16-autocast at batch 64 and 128,
batch-1 inference at 224 and 448 with memory, a KNN + linear-probe DAVIS-style evaluation on two synthetic 480p
sequences (frames/s, compiles), and the projected wall-clock of 500 YouTube-VOS epochs. Run it through
tools/gpu_check.sh (installs wheels from .whl/ first); --tiny runs a toy model on any CPU.

    tools/gpu_check.sh            # on the GPU machine; JSON to $OUT/gpu_check.json when OUT is set
    tools/gpu_check.sh --tiny     # CPU smoke run of the same code
"""

import argparse
import json
import os
import pathlib
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy model and shapes: runs in about a minute on a CPU")
    parser.add_argument("--out", help="JSON file to write (default: $OUT/gpu_check.json when OUT is set)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from flowfeat_jax import cli
    from flowfeat_jax.apps import gpu_check

    def run():
        out = args.out or (pathlib.Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
        if out is not None and not pathlib.Path(out).absolute().parent.is_dir():
            raise FileNotFoundError(f"output folder of {out} does not exist")
        result = gpu_check.run(args.tiny)
        if out is not None:
            pathlib.Path(out).write_text(json.dumps(result, indent=2, default=str) + "\n")
            print(f"wrote {out}")
        print(gpu_check.format_table(result))

    return cli.run_guarded(run, prog="gpu_check", verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
