"""Benchmark the FlowFeat train step and forward of a config: compile time, step time, images/s, inference latency,
peak memory, FLOPs per image (XLA cost analysis) and MFU (on GPUs with a known peak), optionally against torch.

    OMP_WAIT_POLICY=PASSIVE python tools/benchmark.py --config ytvos_dinov2_s14 --batch 2 --torch --out bench.json

--config is a name in configs/ (without .py) or a config file; `--config.KEY=VALUE` overrides any of its keys, as for
flowfeat_jax.main (e.g. --config.train.batch_size=8 --config.model.dtype=bfloat16). Encoders named by a hub name are replaced by a random
init of the same architecture (noted in the JSON). --size H W sets the crop side (square); the frame and flow sides
keep the config's ratio to it. With --torch the torch FlowFeat (same weights) and the eager fp32 reference step run
in the same process, interleaved with JAX, on the same threads. JSON: {"device", "config", "batch", "size", "dtype",
"jax": {"compile_s", "train_step_ms", "train_img_per_s", "infer_ms", "infer_ms_batch", "peak_mem_mb",
"flops_per_img", "mfu", ...p10/p90 spreads}, "torch": {...}, "threads", "load_avg", "notes", ...}.
"""

import argparse
import json
import os
import pathlib
import sys


def parse_args(argv):
    from flowfeat_jax.cli import HelpFormatter, split_config_overrides  # light: --help answers at once

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="a name in configs/ or a path to a config .py file")
    parser.add_argument("--batch", type=int, help="batch size (default: the config's train.batch_size)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="crop side (default: train.input_size)")
    parser.add_argument("--dtype", choices=("f32", "bf16"), help="compute dtype (default: the config's model.dtype)")
    parser.add_argument("--torch", action="store_true", help="also time the torch forward and reference step")
    parser.add_argument("--steps", type=int, default=10, help="timed calls of each function (after 2 warm-up calls)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    return split_config_overrides(parser, argv)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin against XLA's
    from flowfeat_jax import cli
    from flowfeat_jax.apps import bench
    from flowfeat_jax.config import load_config

    def run():
        out = pathlib.Path(args.out)
        if not out.absolute().parent.is_dir():
            raise FileNotFoundError(f"output folder of {out} does not exist")
        config = cli.apply_config_overrides(load_config(args.config), overrides)
        result = bench.run_benchmark(config, batch=args.batch, size=args.size, dtype=args.dtype,
                                     with_torch=args.torch, steps=args.steps, config_name=args.config)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(bench.format_table(result))
        print(f"wrote {out}")

    return cli.run_guarded(run, prog="benchmark", verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
