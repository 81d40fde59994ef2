"""Features of one image in an .npz, optionally as PCA PNGs.

  python tools/extract_features.py --encoder facebook/dinov2-small --image frame.jpg --out feats.npz --pca feats.png
  python tools/extract_features.py --checkpoint runs/ytvos_dinov2_s14 --image frame.jpg --out feats.npz --pca f.png

--encoder: `encoder` = final-LayerNorm patch tokens (h, w, C) float32 of an HF encoder.
--checkpoint (a run directory, e.g. one written by tools/import_torch.py; its EMA decoder): `encoder` as above (of
the last hooked block) and `flowfeat` = FlowFeat features (H, W, d) float32; --pca also writes <name>_flowfeat.png.
The image is resized (bilinear) to --size H W, by default to the nearest multiple of the patch size (of twice the
patch size with --checkpoint, which the decoder needs), and normalised with the ImageNet mean/std (recipe "Image
normalisation").
"""

import argparse
import pathlib
import sys

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", help="HF hub name or local checkpoint directory")
    source.add_argument("--checkpoint", help="FlowFeat run directory or checkpoints/<step> folder")
    parser.add_argument("--image", required=True, help="input image (any format PIL reads)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size, multiples of the patch")
    parser.add_argument("--out", required=True, help="output .npz with `encoder` (h, w, C) float32")
    parser.add_argument("--pca", help="optional PNG of a 3-component PCA of the features")
    parser.add_argument("--pos-interp", choices=("hf", "hub"), help="--encoder position resizing (default: hf)")
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    return parser.parse_args(argv)


def load_image(path: str, size: tuple[int, int] | None, multiple: int) -> np.ndarray:
    """RGB image resized bilinearly to `size` (default: each side rounded to a multiple of `multiple`), ImageNet
    normalised, as float32 (H, W, 3)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is None:
                size = tuple(max(multiple, round(n / multiple) * multiple) for n in (image.height, image.width))
            resized = image.resize((size[1], size[0]), Image.BILINEAR)
    except (OSError, SyntaxError) as e:  # PIL: missing, truncated or unknown files
        raise ValueError(f"cannot read image {path}: {getattr(e, 'strerror', None) or e}") from e
    return (np.asarray(resized, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def _flowfeat_features(checkpoint: str, image_path: str, size) -> tuple[dict, int, np.ndarray]:
    """({encoder (h, w, C), flowfeat (H, W, d)}, patch size, image) of the EMA FlowFeat of a run directory."""
    import jax.numpy as jnp

    from flowfeat_jax.inference import load_flowfeat
    from flowfeat_jax.models.dpt import check_token_grid
    from flowfeat_jax.models.flowfeat import forward

    model, _, _ = load_flowfeat(checkpoint)
    patch = model.cfg.encoder.patch_size
    if size is not None:
        check_token_grid(*size, patch)
    image = load_image(image_path, size, 2 * patch)
    encoder, flowfeat = forward(model, jnp.asarray(image)[None])
    arrays = {"encoder": np.asarray(encoder[0], np.float32), "flowfeat": np.asarray(flowfeat[0], np.float32)}
    return arrays, patch, image


def _encoder_features(encoder: str, image_path: str, size, pos_interp) -> tuple[dict, int, np.ndarray]:
    """({encoder: final-norm patch tokens (h, w, C)}, patch size, image) of an HF encoder."""
    import jax.numpy as jnp

    from flowfeat_jax.models.vit import check_image_size, forward, patch_tokens
    from flowfeat_jax.ports.vit import from_pretrained

    model = from_pretrained(encoder, pos_interp=pos_interp)
    patch = model.cfg.patch_size
    if size is not None:
        check_image_size(*size, patch)
    image = load_image(image_path, size, patch)
    out = forward(model, jnp.asarray(image)[None])
    features = patch_tokens(out.last_hidden_state, model.cfg, out.grid)[0]
    return {"encoder": np.asarray(features, np.float32)}, patch, image


def main(argv=None) -> int:
    args = parse_args(argv)
    from flowfeat_jax import cli

    return cli.run_guarded(lambda: extract(args), prog="extract_features", verbose=args.verbose)


def extract(args: argparse.Namespace) -> None:
    """Features of args.image to args.out (and PCA pictures to args.pca)."""
    from flowfeat_jax import viz  # imported here so that --help and argument errors answer at once

    for output in (args.out, args.pca):
        if output is not None and not pathlib.Path(output).resolve().parent.is_dir():
            raise FileNotFoundError(f"output folder of {output} does not exist")
    if args.checkpoint:
        arrays, patch, image = _flowfeat_features(args.checkpoint, args.image, args.size)
    else:
        arrays, patch, image = _encoder_features(args.encoder, args.image, args.size, args.pos_interp)
    np.savez(args.out, **arrays)
    shapes = ", ".join(f"{name} {value.shape}" for name, value in arrays.items())
    print(f"wrote {args.out}: {shapes} from image {image.shape[0]}x{image.shape[1]}")
    if args.pca:
        viz.save_png(args.pca, viz.pca_image(arrays["encoder"]), scale=patch)
        print(f"wrote {args.pca}")
        if "flowfeat" in arrays:
            pca = pathlib.Path(args.pca)
            flowfeat_pca = pca.with_name(f"{pca.stem}_flowfeat{pca.suffix}")
            viz.save_png(flowfeat_pca, viz.pca_image(arrays["flowfeat"]), scale=1)
            print(f"wrote {flowfeat_pca}")


if __name__ == "__main__":
    sys.exit(main())
