"""Export a JAX FlowFeat checkpoint as a PyTorch state dict in the reference layout (model.py FlowFeat).

    python tools/export_torch.py --checkpoint runs/ytvos_dinov2_s14 --out flowfeat.pth [--safetensors] [--decoder ema]

Keys: `encoder.*` in torch-hub DINO/DINOv2/MAE names, `decoder.*` in reference DecodeDPT names; the reference
`FlowFeat(cfg).load_state_dict(sd, strict=True)` accepts it, and so does flowfeat_jax.torch_ref.flowfeat
(`load_torch_flowfeat(path)`, torch only). The online decoder is exported by default, as the reference releases it
(recipe.md step 12: its checkpoints hold no EMA decoder); `--decoder ema` exports the EMA teacher instead. The
architecture (head count, family, pos_interp, decoder sizes) goes into the safetensors metadata, or beside a .pth as
`<out>.json`, so tools/import_torch.py and load_torch_flowfeat rebuild the same model. An existing --out is kept
unless --overwrite.
"""

import argparse
import sys


def parse_args(argv):
    from flowfeat_jax.cli import HelpFormatter  # light: --help answers at once

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory or one checkpoints/<step> folder")
    parser.add_argument("--out", required=True, help="output file (.pth, or .safetensors with --safetensors)")
    parser.add_argument("--safetensors", action="store_true", help="write safetensors instead of torch.save")
    parser.add_argument("--decoder", choices=("online", "ema"), default="online", help="decoder (default: online)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from flowfeat_jax import cli
    from flowfeat_jax.apps.torch_files import export_flowfeat  # after argument parsing, so --help answers at once

    def run() -> None:
        state, notes = export_flowfeat(args.checkpoint, args.out, decoder=args.decoder,
                                       use_safetensors=args.safetensors, overwrite=args.overwrite)
        size = sum(v.size for v in state.values())
        print(f"wrote {args.out}: {len(state)} tensors, {size / 1e6:.1f}M parameters ({args.decoder} decoder)")
        for note in notes:
            print(f"note: {note}")

    return cli.run_guarded(run, prog="export_torch", verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
