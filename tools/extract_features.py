"""Encoder features of one image: final-LayerNorm patch tokens (h, w, C) float32 in an .npz, optionally a PCA PNG.

  python tools/extract_features.py --encoder facebook/dinov2-small --image frame.jpg --out feats.npz --pca feats.png

The image is resized (bilinear) to --size H W, by default to the nearest multiple of the patch size, and normalised
with the ImageNet mean/std (recipe "Image normalisation").
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
    parser.add_argument("--encoder", required=True, help="HF hub name or local checkpoint directory")
    parser.add_argument("--image", required=True, help="input image (any format PIL reads)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size, multiples of the patch")
    parser.add_argument("--out", required=True, help="output .npz with `encoder` (h, w, C) float32")
    parser.add_argument("--pca", help="optional PNG of a 3-component PCA of the features")
    parser.add_argument("--pos-interp", choices=("hf", "hub"), help="position-table resizing (default: hf)")
    return parser.parse_args(argv)


def load_image(path: str, size: tuple[int, int] | None, patch_size: int) -> np.ndarray:
    """RGB image resized bilinearly to `size` (default: each side rounded to a multiple of the patch), ImageNet
    normalised, as float32 (H, W, 3)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is None:
            size = tuple(max(patch_size, round(n / patch_size) * patch_size) for n in (image.height, image.width))
        resized = image.resize((size[1], size[0]), Image.BILINEAR)
    return (np.asarray(resized, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported here so that --help and argument errors answer at once.
    import jax.numpy as jnp

    from flowfeat_jax import viz
    from flowfeat_jax.models.vit import check_image_size, forward, patch_tokens
    from flowfeat_jax.ports.vit import from_pretrained

    try:
        for output in (args.out, args.pca):
            if output is not None and not pathlib.Path(output).resolve().parent.is_dir():
                raise FileNotFoundError(f"output folder of {output} does not exist")
        model = from_pretrained(args.encoder, pos_interp=args.pos_interp)
        patch = model.cfg.patch_size
        if args.size is not None:
            check_image_size(*args.size, patch)
        image = load_image(args.image, args.size, patch)
    except (OSError, ValueError) as error:  # missing/unreadable files, bad sizes, bad checkpoints
        print(f"extract_features: error: {error}", file=sys.stderr)
        return 1
    out = forward(model, jnp.asarray(image)[None])
    features = np.asarray(patch_tokens(out.last_hidden_state, model.cfg, out.grid)[0], np.float32)
    np.savez(args.out, encoder=features)
    print(f"wrote {args.out}: encoder {features.shape} from image {image.shape[0]}x{image.shape[1]}")
    if args.pca:
        viz.save_png(args.pca, viz.pca_image(features), scale=patch)
        print(f"wrote {args.pca}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
