"""Export teacher flows of video frame pairs to ArrayRecord shards for training.

  python tools/export_flow.py --videos /data/youtube-vos-2019 --out /data/flow_ytvos_raft --method raft \
      --checkpoint raft-sintel.pth --iters 20 --device cuda --batch-size 32
  python tools/export_flow.py --videos /data/youtube-vos-2019 --out /data/flow_ytvos_searaft --method searaft \
      --checkpoint Tartan-C-T-TSKH-spring540x960-M.pth --device cuda --batch-size 32
  python tools/export_flow.py --videos /data/davis2016:train --out /tmp/flow_dis --method dis   # CPU, no weights

Parallel workers: run the same command with --num-shards N --shard-index I for I = 0..N-1 (same --out); each writes
its own shards and manifest-I-of-N.json, and the pipeline reads the directory once all parts exist. Rerunning an
interrupted command resumes: finished shards are kept. Layout: flowfeat_jax/data/records.py.
A YouTube-VOS root exports its 30-fps `train_all_frames/JPEGImages` (what the reference trains on); the 6-fps
`train/JPEGImages` only when asked for, as `--videos <root>:train`.
"""

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flowfeat_jax import cli  # noqa: E402
from flowfeat_jax.data import export, videos  # noqa: E402
from flowfeat_jax.flow import methods  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    frames, files = "/".join(videos.FRAME_SUFFIXES), "/".join(videos.VIDEO_SUFFIXES)
    parser.add_argument("--videos", required=True,
                        help=f"one video (a folder of {frames} frames, sorted by name, or a {files} file), a folder of "
                             "videos, a DAVIS root[:split] (JPEGImages/480p, ImageSets), a YouTube-VOS root[:split] "
                             "(train_all_frames/JPEGImages/<id>), or a text file listing one video path per line")
    parser.add_argument("--split", default=None,
                        help="DAVIS ImageSets or YouTube-VOS split (or PATH:split); YouTube-VOS: train_all_frames "
                             "(default, the 30-fps frames the reference trains on), train (6 fps)")
    parser.add_argument("--out", required=True, help="output directory (ArrayRecord shards + manifest.json)")
    parser.add_argument("--method", default="searaft", choices=methods.METHODS,
                        help="flow teacher (dis: OpenCV, no weights)")
    parser.add_argument("--checkpoint", default=None, help="flow network weights (searaft, raft)")
    parser.add_argument("--iters", type=int, default=None, help="refinement iterations (default: SEA-RAFT 4, RAFT 20)")
    parser.add_argument("--gap", type=int, default=2, help="partners t +- 1..gap")
    parser.add_argument("--frame-size", type=int, default=448, help="stored square frame side (short side, centre crop)")
    parser.add_argument("--flow-size", type=int, default=224, help="side at which the flow is computed")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="quality of the stored frames")
    parser.add_argument("--min-frames", type=int, default=10, help="skip (and count) shorter videos")
    parser.add_argument("--device", default="cpu", help="torch device of a flow network: cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per flow-network call")
    parser.add_argument("--videos-per-shard", type=int, default=32, help="videos per ArrayRecord shard")
    parser.add_argument("--num-shards", type=int, default=1, help="number of exporter workers")
    parser.add_argument("--shard-index", type=int, default=0, help="this worker")
    parser.add_argument("--overwrite", action="store_true", help="replace an export made with other parameters")
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    return parser.parse_args(argv)


def run_export(args: argparse.Namespace) -> None:
    cfg = export.ExportConfig(
        method=args.method,
        checkpoint=args.checkpoint,
        iters=args.iters,
        gap=args.gap,
        frame_size=args.frame_size,
        flow_size=args.flow_size,
        jpeg_quality=args.jpeg_quality,
        min_frames=args.min_frames,
        device=args.device,
        batch_size=args.batch_size,
        videos_per_shard=args.videos_per_shard,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
    )
    manifest = export.export_flows(args.videos, args.out, cfg, split=args.split, overwrite=args.overwrite)
    print(
        f"exported {manifest['num_videos']} videos, {manifest['num_frames']} frames, {manifest['num_pairs']} pairs "
        f"({manifest['num_nonfinite_pairs']} non-finite) to {args.out}; skipped {manifest['num_skipped']} short videos"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_guarded(lambda: run_export(args), prog="export_flow", verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
