"""Encoder and FlowFeat features of one image, a folder of frames, a video file or a glob of images.

  python tools/extract_features.py --checkpoint runs/demo --input frame.jpg --out feats.npz --pca pca.png
  python tools/extract_features.py --checkpoint runs/demo --input video.mp4 --out video_feats
  python tools/extract_features.py --checkpoint flowfeat.pth --input 'frames/*.png' --out feats --stride 1
  python tools/extract_features.py --encoder facebook/dinov2-small --input frames/ --out feats

Model: --checkpoint is a FlowFeat run directory, one checkpoints/<step> folder, or a reference-layout .pth /
.safetensors file (tools/export_torch.py, a released model); its online decoder by default (the model the reference
releases), --decoder ema for the teacher. --encoder is a Hugging Face encoder alone (hub name or local directory).

Input (--input, or --image): one image (.jpg/.jpeg/.png or anything PIL reads; 16-bit greyscale PNGs are scaled
from 16 bits), a folder of .jpg/.jpeg/.png frames (sorted by name), a video file (.mp4/.webm/.avi/.mkv/.mov, PyAV),
or a quoted glob of images (sorted). Frames are resized bilinearly to --size H W (default: each side rounded to the
nearest multiple of twice the patch, which the decoder needs; of the patch for --encoder), ImageNet-normalised and
run in batches of --batch-size through one compiled function (the last batch is padded).

Output. One image: --out NAME.npz with `encoder` (h, w, C) and `flowfeat` (H/stride, W/stride, d). Several frames:
--out DIR, one array store per video: DIR/encoder.npy (T, h, w, C), DIR/flowfeat.npy (T, H/stride, W/stride, d),
DIR/frames.txt (the source of each row) and DIR/info.json (model, input size, stride, dtype); read one frame with
np.load(DIR/"flowfeat.npy", mmap_mode="r")[t]. `encoder` is always the encoder's patch grid after its final
LayerNorm (of the last hooked block for FlowFeat); `flowfeat` is average-pooled by --stride (1 = input size).
--pca writes a PCA picture of the (first) frame's encoder features, and <name>_flowfeat.png of its FlowFeat.
"""

import argparse
import glob
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

def parse_args(argv):
    from flowfeat_jax.cli import HelpFormatter  # both light: --help answers at once
    from flowfeat_jax.data.videos import FRAME_SUFFIXES, VIDEO_SUFFIXES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="FlowFeat run directory, checkpoints/<step> folder, or .pth/.safetensors")
    source.add_argument("--encoder", help="Hugging Face encoder alone: hub name or local directory")
    parser.add_argument("--input", "--image", dest="input", required=True,
                        help=f"an image, a folder of {'/'.join(FRAME_SUFFIXES)} frames, a video file "
                             f"({'/'.join(VIDEO_SUFFIXES)}) or a quoted glob of images")
    parser.add_argument("--out", required=True, help="NAME.npz for one image; for several frames a folder (array "
                        "store; an existing one is replaced once the new one is complete)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="model input size (default: the frame size rounded to multiples of 2 x patch)")
    parser.add_argument("--stride", type=int, default=4, help="FlowFeat average-pooling factor, 1 = full size")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored dtype")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per compiled call")
    parser.add_argument("--decoder", choices=("online", "ema"), default="online",
                        help="--checkpoint decoder (online: the released model)")
    parser.add_argument("--pca", help="optional PNG: 3-component PCA of the (first) frame's features")
    parser.add_argument("--pos-interp", choices=("hf", "hub"), help="--encoder position resizing (default: hf)")
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    return parser.parse_args(argv)


def input_frames(spec: str):
    """(videos.Video of the input, whether it is one image)."""
    from flowfeat_jax.data import videos

    path = pathlib.Path(spec)
    if path.is_file() and path.suffix.lower() not in videos.VIDEO_SUFFIXES:
        return videos.Video(name=path.stem, path=path, frames=(path,), num_frames=1), True
    if path.exists():
        listed = videos.list_videos(path, min_frames=1).videos
        if len(listed) != 1:
            raise ValueError(f"--input {spec}: holds {len(listed)} videos; give one video (a folder of frames or a "
                             "video file) per call")
        return listed[0], False
    matches = sorted(pathlib.Path(p) for p in glob.glob(spec) if pathlib.Path(p).is_file())
    if not matches:
        raise FileNotFoundError(f"--input {spec}: no such image, folder or video file, and no file matches it as a glob")
    return videos.Video(name=spec, path=path, frames=tuple(matches), num_frames=len(matches)), False


def check_outputs(args: argparse.Namespace, single: bool) -> None:
    """Every output path is checked before the model is loaded, so bad ones cost nothing and overwrite nothing."""
    out = pathlib.Path(args.out)
    if single and out.suffix != ".npz":
        raise ValueError(f"--out {out}: one image's features go to a .npz file; give a name ending in .npz")
    if not single and (out.suffix == ".npz" or out.is_file()):
        raise ValueError(f"--out {out}: several frames go to a folder (one array store per video), not a file")
    if args.pca is not None:
        if pathlib.Path(args.pca).suffix.lower() != ".png":
            raise ValueError(f"--pca {args.pca}: the picture is written as PNG; give a name ending in .png")
        if pathlib.Path(args.pca).is_dir():
            raise ValueError(f"--pca {args.pca}: is a folder; give a .png file name")
    for output in (args.out, args.pca):
        if output is not None and not pathlib.Path(output).resolve().parent.is_dir():
            raise FileNotFoundError(f"output folder of {output} does not exist")
    if args.stride < 1 or args.batch_size < 1:
        raise ValueError(f"--stride {args.stride} / --batch-size {args.batch_size}: must be positive integers")


def make_extractor(args: argparse.Namespace):
    import flowfeat_jax  # after argument parsing, so --help answers at once
    from flowfeat_jax import inference
    from flowfeat_jax.ports.registry import from_pretrained

    if args.checkpoint:
        return flowfeat_jax.load(args.checkpoint, decoder=args.decoder, size=args.size, stride=args.stride,
                                 dtype=args.dtype)
    encoder = from_pretrained(args.encoder, pos_interp=args.pos_interp)
    return inference.FeatureExtractor(encoder, size=args.size, dtype=args.dtype)


def frame_names(video) -> list[str]:
    if video.frames:
        return [str(p) for p in video.frames]
    return [f"{video.path}#{index}" for index in range(video.num_frames)]


def batched_features(extractor, video, batch_size: int):
    """Yields (frame size, encoder, flowfeat) per batch of `batch_size` frames of `video`; the last batch is padded with copies
    of its last frame so that every call has one shape (one compilation), and the padding is cut off again."""
    from flowfeat_jax.data import videos
    from flowfeat_jax.progress import progress

    batch = []
    with progress(total=video.num_frames, desc="features", unit="frame") as bar:
        for frame in videos.iter_frames(video):
            batch.append(frame)
            if len(batch) == batch_size:
                yield frame.shape[:2], *extractor(np.stack(batch))
                bar.update(len(batch))
                batch = []
        if batch:
            count = len(batch)
            batch += [batch[-1]] * (batch_size - count if video.num_frames > batch_size else 0)
            encoder, flowfeat = extractor(np.stack(batch))
            yield frame.shape[:2], encoder[:count], None if flowfeat is None else flowfeat[:count]
            bar.update(count)


def write_store(directory: pathlib.Path, extractor, video, batch_size: int) -> tuple[dict, tuple[int, int]]:
    """The array store of one video in `directory` (rows written batch by batch into memory-mapped .npy files);
    returns the array shapes and the model input size."""
    arrays, row = {}, 0
    for frame_hw, encoder, flowfeat in batched_features(extractor, video, min(batch_size, video.num_frames)):
        for name, values in (("encoder", encoder), ("flowfeat", flowfeat)):
            if values is None:
                continue
            if name not in arrays:
                arrays[name] = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=values.dtype,
                                                         shape=(video.num_frames, *values.shape[1:]))
            arrays[name][row : row + len(values)] = values
        row += len(encoder)
    if row != video.num_frames:
        raise ValueError(f"--input {video.path}: decoded {row} frames, the container announced {video.num_frames}")
    for array in arrays.values():
        array.flush()
    (directory / "frames.txt").write_text("\n".join(frame_names(video)) + "\n")
    return {name: array.shape for name, array in arrays.items()}, extractor.input_size(*frame_hw)


def replace_path(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Moves the finished `tmp` to `out`; an earlier `out` is removed only now, after the new one is complete."""
    if out.is_dir():
        old = out.with_name(f".{out.name}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def save_pca(path: str, encoder: np.ndarray, flowfeat: np.ndarray | None, patch: int, stride: int) -> list[str]:
    from flowfeat_jax import viz

    viz.save_png(path, viz.pca_image(encoder), scale=patch)
    written = [path]
    if flowfeat is not None:
        pca = pathlib.Path(path)
        flowfeat_pca = str(pca.with_name(f"{pca.stem}_flowfeat{pca.suffix}"))
        viz.save_png(flowfeat_pca, viz.pca_image(flowfeat), scale=stride)
        written.append(flowfeat_pca)
    return written


def extract(args: argparse.Namespace) -> None:
    """Features of args.input to args.out (and PCA pictures to args.pca)."""
    video, single = input_frames(args.input)
    check_outputs(args, single)
    extractor = make_extractor(args)
    stride = args.stride if extractor.is_flowfeat else 1
    out, start = pathlib.Path(args.out), time.perf_counter()
    if single:
        ((_, encoder, flowfeat),) = batched_features(extractor, video, 1)
        arrays = {"encoder": encoder[0]} | ({} if flowfeat is None else {"flowfeat": flowfeat[0]})
        tmp = out.with_name(f".{out.name}.tmp")
        with open(tmp, "wb") as f:  # a file object: np.savez appends no second suffix
            np.savez(f, **arrays)
        replace_path(tmp, out)
        shapes = {name: value.shape for name, value in arrays.items()}
    else:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
        try:
            shapes, input_size = write_store(tmp, extractor, video, args.batch_size)
            info = {"model": args.checkpoint or args.encoder, "decoder": args.decoder if args.checkpoint else None,
                    "input": str(args.input), "num_frames": video.num_frames, "input_size": list(input_size),
                    "stride": stride, "dtype": args.dtype, "shapes": {k: list(v) for k, v in shapes.items()}}
            (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
            replace_path(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        arrays = {name: np.load(out / f"{name}.npy", mmap_mode="r")[0] for name in shapes}
    seconds = time.perf_counter() - start
    described = ", ".join(f"{name} {shape} {args.dtype}" for name, shape in shapes.items())
    size_mb = sum(p.stat().st_size for p in ([out] if single else out.iterdir())) / 1e6
    print(f"wrote {out}: {described}; {size_mb:.1f} MB, {video.num_frames} frame(s) in {seconds:.1f} s "
          f"({video.num_frames / seconds:.2f} frames/s)")
    if args.pca:
        for path in save_pca(args.pca, np.asarray(arrays["encoder"], np.float32),
                             None if "flowfeat" not in arrays else np.asarray(arrays["flowfeat"], np.float32),
                             extractor.patch_size, stride):
            print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from flowfeat_jax import cli  # imported after argument parsing, so --help and argument errors answer at once

    return cli.run_guarded(lambda: extract(args), prog="extract_features", verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
