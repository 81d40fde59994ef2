"""Score DAVIS result PNGs with J&F (semi-supervised rules of davis2017-evaluation).

    python tools/score_davis.py --davis ROOT --results DIR --out SCORES.json [--sequences a,b] [--csv FILE]
        [--max_frames N]

Reads ROOT/Annotations/480p/<seq>/*.png (DAVIS-2017 palette indices or DAVIS-2016 0/255 masks) and
DIR/<seq>/<frame>.png (palette or greyscale object indices), prints a per-object table and writes the JSON
{"objects": {"<seq>_<k>": {...}}, "global": {"JF_mean", "J_mean", "F_mean", ...}}.
"""

import json
import pathlib

from absl import app, flags

from flowfeat_jax import cli
from flowfeat_jax.eval import jf

_DAVIS = flags.DEFINE_string("davis", None, "DAVIS root (with Annotations/480p and ImageSets).", required=True)
_RESULTS = flags.DEFINE_string("results", None, "Folder of result PNGs, <seq>/<frame>.png.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output JSON file.", required=True)
_SEQUENCES = flags.DEFINE_list("sequences", None, "Sequences to score (default: the ImageSets split).")
_SPLIT = flags.DEFINE_string("split", "val", "ImageSets split used when --sequences is not given.")
_CSV = flags.DEFINE_string("csv", None, "Optional CSV file with the same table.")
_MAX_FRAMES = flags.DEFINE_integer(
    "max_frames", 0, "Score only the first N frames of each sequence, as `flowfeat_jax.evaluate --max_frames=N` "
    "wrote them (0 = all frames)."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks on errors.")


def score() -> None:
    scores = jf.score_results(_DAVIS.value, _RESULTS.value, _SEQUENCES.value, split=_SPLIT.value,
                              max_frames=_MAX_FRAMES.value or None)
    print(jf.format_table(scores))
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(scores, indent=2))
    if _CSV.value:
        jf.write_csv(scores, _CSV.value)


def main(argv) -> int:
    del argv
    return cli.run_guarded(score, prog="score_davis", verbose=_VERBOSE.value)  # one line naming the file


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser("score_davis"))
