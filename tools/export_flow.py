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
import dataclasses
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flowfeat_jax import cli  # noqa: E402
from flowfeat_jax.data import export, videos  # noqa: E402
from flowfeat_jax.flow import methods  # noqa: E402

DEFAULTS = export.ExportConfig()  # the flags' defaults


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
    parser.add_argument("--method", default=DEFAULTS.method, choices=methods.METHODS,
                        help="flow teacher (dis: OpenCV, no weights)")
    parser.add_argument("--checkpoint", default=DEFAULTS.checkpoint, help="flow network weights (searaft, raft)")
    parser.add_argument("--iters", type=int, default=DEFAULTS.iters,
                        help="refinement iterations (default: SEA-RAFT 4, RAFT 20)")
    parser.add_argument("--gap", type=int, default=DEFAULTS.gap, help="partners t +- 1..gap")
    parser.add_argument("--frame-size", type=int, default=DEFAULTS.frame_size,
                        help="stored square frame side (short side, centre crop)")
    parser.add_argument("--flow-size", type=int, default=DEFAULTS.flow_size, help="side at which the flow is computed")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULTS.jpeg_quality, help="quality of the stored frames")
    parser.add_argument("--min-frames", type=int, default=DEFAULTS.min_frames, help="skip (and count) shorter videos")
    parser.add_argument("--device", default=DEFAULTS.device, help="torch device of a flow network: cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="pairs per flow-network call")
    parser.add_argument("--videos-per-shard", type=int, default=DEFAULTS.videos_per_shard,
                        help="videos per ArrayRecord shard")
    parser.add_argument("--num-shards", type=int, default=DEFAULTS.num_shards, help="number of exporter workers")
    parser.add_argument("--shard-index", type=int, default=DEFAULTS.shard_index, help="this worker")
    parser.add_argument("--overwrite", action="store_true", help="replace an export made with other parameters")
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    return parser.parse_args(argv)


def run_export(args: argparse.Namespace) -> None:
    # Each ExportConfig field is the flag of its name (--frame-size -> frame_size).
    cfg = export.ExportConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(export.ExportConfig)})
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
