"""Import a released FlowFeat .pth (reference model.py FlowFeat state dict) as a JAX run directory.

    python tools/import_torch.py --pth dino2_s14_flowfeat_yt.pth --out runs/dinov2_s14_yt [--config ytvos_dinov2_s14]

Writes OUT/config.json, OUT/checkpoints/0/{state,meta} (online = EMA decoder = the file's decoder; a training
snapshot's `decoder_ema` becomes the EMA decoder) and OUT/encoder/ (the encoder as an HF-format directory), usable by
flowfeat_jax.inference.load_flowfeat, evaluation, tools/extract_features.py --checkpoint, tools/export_torch.py and
fine-tuning. The backbone is the one the file records (exports of tools/export_torch.py), else read from the
tensor shapes: the head count of a width other than the released ones (384, 768, 1024) must be given (--num-heads
or --config), and --family picks DINO or MAE where the weights do not tell. --config (a configs/ name or a config .py
file) adds its training settings. Nothing is written when the file does not match.
"""

import argparse
import sys


def parse_args(argv):
    from flowfeat_jax.cli import HelpFormatter  # light: --help answers at once

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--pth", required=True, help="released FlowFeat weights (.pth or .safetensors)")
    parser.add_argument("--out", required=True, help="new run directory (must not exist)")
    parser.add_argument("--config", help="experiment config: a name in configs/ or a path to a config .py file")
    parser.add_argument("--num-heads", type=int, help="encoder heads, for a file without a recorded architecture")
    parser.add_argument("--family", choices=("dinov2", "dino", "mae"), help="encoder family (default: from the file)")
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from flowfeat_jax import cli
    from flowfeat_jax.config import load_config, validate_config
    from flowfeat_jax.apps.torch_files import import_flowfeat  # after argument parsing, so --help answers at once

    def run() -> None:
        config = load_config(args.config) if args.config else None
        if config is not None:
            validate_config(config)
        out = import_flowfeat(args.pth, args.out, config, num_heads=args.num_heads, family=args.family)
        print(f"wrote {out} (encoder {out / 'encoder'}, checkpoint step 0)")

    return cli.run_guarded(run, prog="import_torch", verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
