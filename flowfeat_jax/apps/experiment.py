"""The DAVIS "does it learn" experiment: train FlowFeat, then score three kinds of features on the same sequences.

Rows of the comparison (same config, same seed, so all three share one frozen encoder):
- "encoder": the encoder's final-LayerNorm patch features (`FlowFeat.encode(...).final`);
- "untrained": the decoder as initialised, before any step (`loop.build_flowfeat`): what the DPT architecture alone
  adds to the encoder, the control that shows whether training is what makes a difference;
- "flowfeat": the trained run's online decoder (`inference.load_flowfeat`), the model the reference validates and
  releases (recipe.md step 12); `--config.eval.decoder=ema` scores the EMA teacher instead.
Each row goes through `eval.features.evaluate_davis` (label propagation "knn" and the first-frame linear probe).
The outputs are a Markdown/CSV table, a bar chart of J&F, J and F per protocol, a PCA picture of the three feature
kinds on the same frames, and a loss curve of the run, drawn with PIL (no matplotlib).
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flowfeat_jax import inference, viz
from flowfeat_jax.apps import validation
from flowfeat_jax.eval import davis
from flowfeat_jax.eval import features as features_lib
from flowfeat_jax.train import loop

ROWS = ("encoder", "untrained", "flowfeat")
ROW_LABELS = {"encoder": "encoder features", "untrained": "untrained decoder", "flowfeat": "FlowFeat (trained)"}
ROW_COLOURS = {"encoder": (150, 150, 150), "untrained": (230, 159, 0), "flowfeat": (0, 114, 178)}
METRICS = (("JF_mean", "J&F"), ("J_mean", "J"), ("F_mean", "F"))
Results = dict[str, dict[str, dict[str, float]]]  # {row: {protocol: global scores}}


def davis_root_of(videos: str) -> str:
    """The folder of a `data.videos` spec `PATH[:split]` (the split suffix dropped)."""
    path, _, split = videos.rpartition(":")
    return path if path and "/" not in split else videos


def results_markdown(results: Results) -> str:
    """One row per feature kind, J&F / J / F per protocol; the best J&F of each protocol in bold."""
    protocols = list(next(iter(results.values())))
    header = "| features | " + " | ".join(f"{p} J&F | {p} J | {p} F" for p in protocols) + " |"
    lines = [header, "| --- |" + " ---: |" * (3 * len(protocols))]
    best = {p: max(results[row][p]["JF_mean"] for row in results) for p in protocols}
    for row, by_protocol in results.items():
        cells = []
        for p in protocols:
            jf = f"{by_protocol[p]['JF_mean']:.3f}"
            cells += [
                f"**{jf}**" if by_protocol[p]["JF_mean"] == best[p] else jf,
                f"{by_protocol[p]['J_mean']:.3f}",
                f"{by_protocol[p]['F_mean']:.3f}",
            ]
        lines.append(f"| {ROW_LABELS.get(row, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, anchor: str = "la") -> None:
    draw.text(xy, text, fill=(0, 0, 0), font=ImageFont.load_default(), anchor=anchor)


def bar_chart(results: Results, path: str | pathlib.Path, *, title: str = "") -> None:
    """Grouped bars (one colour per feature kind) of J&F, J and F for each protocol, values printed on the bars."""
    protocols = list(next(iter(results.values())))
    rows = list(results)
    bar, gap, group_gap, left, top, plot_h = 34, 4, 36, 56, 40, 300
    group_w = len(rows) * (bar + gap)
    groups = [(p, key, name) for p in protocols for key, name in METRICS]
    width = left + len(groups) * (group_w + group_gap) + 20
    height = top + plot_h + 60 + 18 * len(rows)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    bottom = top + plot_h
    for tick in np.linspace(0, 1, 6):  # y axis: scores in [0, 1]
        y = bottom - tick * plot_h
        draw.line([(left, y), (width - 20, y)], fill=(225, 225, 225))
        _text(draw, (left - 6, y), f"{tick:.1f}", anchor="rm")
    draw.line([(left, top), (left, bottom), (width - 20, bottom)], fill=(0, 0, 0))
    for g, (protocol, key, name) in enumerate(groups):
        x0 = left + group_gap / 2 + g * (group_w + group_gap)
        for r, row in enumerate(rows):
            value = float(results[row][protocol][key])
            x = x0 + r * (bar + gap)
            draw.rectangle([x, bottom - value * plot_h, x + bar, bottom], fill=ROW_COLOURS.get(row, (90, 90, 90)))
            _text(draw, (x + bar / 2, bottom - value * plot_h - 2), f"{value:.2f}", anchor="md")
        _text(draw, (x0 + group_w / 2, bottom + 6), f"{protocol} {name}", anchor="ma")
    _text(draw, (left, 12), title or "DAVIS-2016 val: J&F, J and F per protocol")
    for r, row in enumerate(rows):  # legend
        y = bottom + 30 + 18 * r
        draw.rectangle([left, y, left + 12, y + 12], fill=ROW_COLOURS.get(row, (90, 90, 90)))
        _text(draw, (left + 18, y + 6), ROW_LABELS.get(row, row), anchor="lm")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def loss_curve(metrics_path: str | pathlib.Path, path: str | pathlib.Path, keys: Sequence[str] = ("loss",)) -> None:
    """A line chart of the logged training losses over steps (metrics.jsonl of a run)."""
    records = [json.loads(line) for line in pathlib.Path(metrics_path).read_text().splitlines() if line.strip()]
    records = [r for r in records if all(k in r for k in keys)]
    if not records:
        raise ValueError(f"{metrics_path}: no logged {', '.join(keys)}")
    steps = np.array([r["step"] for r in records], float)
    left, top, plot_w, plot_h = 60, 30, 520, 240
    image = Image.new("RGB", (left + plot_w + 30, top + plot_h + 44 + 16 * len(keys)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    values = np.array([[r[k] for k in keys] for r in records], float)
    low, high = float(values.min()), float(values.max())
    span = max(high - low, 1e-12)

    def x_of(step):
        return left + (step - steps.min()) / max(steps.max() - steps.min(), 1) * plot_w

    def y_of(value):
        return top + (1 - (value - low) / span) * plot_h

    for tick in np.linspace(low, high, 5):
        draw.line([(left, y_of(tick)), (left + plot_w, y_of(tick))], fill=(225, 225, 225))
        _text(draw, (left - 6, y_of(tick)), f"{tick:.3f}", anchor="rm")
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill=(0, 0, 0))
    colours = [(0, 114, 178), (213, 94, 0), (0, 158, 115)]
    for i, key in enumerate(keys):
        points = [(x_of(s), y_of(v)) for s, v in zip(steps, values[:, i])]
        draw.line(points + points[-1:], fill=colours[i % 3], width=2)  # a lone point still draws
        y = top + plot_h + 30 + 16 * i
        draw.rectangle([left, y - 5, left + 10, y + 5], fill=colours[i % 3])
        _text(
            draw,
            (left + 16, y),
            f"{key} (logged every {int(steps[1] - steps[0]) if len(steps) > 1 else 1} steps)",
            anchor="lm",
        )
    for tick in np.linspace(steps.min(), steps.max(), 5):
        _text(draw, (x_of(tick), top + plot_h + 4), f"{tick:.0f}", anchor="ma")
    _text(draw, (left + plot_w, top + plot_h + 16), "step", anchor="ra")
    _text(draw, (left, 8), "training loss")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def pca_comparison(models: dict, frames: Sequence[np.ndarray], input_hw: Sequence[tuple[int, int]]) -> np.ndarray:
    """Rows of frame | encoder PCA | untrained-decoder PCA | FlowFeat PCA (one row per frame), uint8.

    `models` maps "untrained" and "flowfeat" to FlowFeat modules that share the encoder; each PCA is fitted on its own
    features of that frame (viz.pca_image), encoder features shown with nearest-neighbour patch blocks.
    """
    feature_fns = {row: features_lib.make_feature_fn(model, "flowfeat") for row, model in models.items()}
    rows = []
    for frame, hw in zip(frames, input_hw):
        resized = np.asarray(Image.fromarray(frame).resize(hw[::-1], Image.BILINEAR))
        outputs = {row: fn(resized[None]) for row, fn in feature_fns.items()}
        encoder = outputs["flowfeat"]["encoder"][0]
        encoder_rgb = np.asarray(Image.fromarray(viz.pca_image(encoder)).resize(hw[::-1], Image.NEAREST))
        pictures = [resized, encoder_rgb] + [
            viz.pca_image(outputs[row]["flowfeat"][0]) for row in ("untrained", "flowfeat")
        ]
        rows.append(np.concatenate(pictures, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    header = Image.new("RGB", (width, 16), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    column = rows[0].shape[1] // 4
    for i, name in enumerate(("frame", "encoder", "untrained decoder", "FlowFeat (trained)")):
        _text(draw, (i * column + 4, 2), name)
    return np.concatenate([np.asarray(header)] + rows, axis=0)


def run_experiment(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    davis_root: str | pathlib.Path,
    *,
    split: str = "val",
    sequences: Sequence[str] | None = None,
    protocols: Sequence[str] = ("knn", "linear"),
    pca_sequences: int = 4,
) -> Results:
    """Export + train (or resume / reuse a finished run in `workdir`), then evaluate the three rows.

    Writes into `out_dir`: `table.md`, `table.csv`, `results.json` (scores, timings, run facts), `bar_chart.png`,
    `pca.png`, `loss.png`, and per row the outputs of `evaluate_davis` under `out_dir/eval/<row>/`.
    """
    workdir, out_dir = pathlib.Path(workdir), pathlib.Path(out_dir)
    sequences = list(sequences) if sequences else davis.list_sequences(davis_root, split)
    timings = {}
    start = time.perf_counter()
    loop.train(config, workdir, validate=validation.davis_validation(config.eval) if config.eval.davis else None)
    timings["train_s"] = time.perf_counter() - start

    trained, _, step = inference.load_flowfeat(workdir, decoder=config.eval.decoder)
    untrained, _ = loop.build_flowfeat(config.model, config.seed)
    common = {
        "split": split,
        "sequences": sequences,
        "protocols": protocols,
        "short_side": config.eval.short_side,
        "max_frames": config.eval.max_frames or None,
    }
    start = time.perf_counter()
    scores = features_lib.evaluate_davis(
        trained, davis_root, out_dir / "eval" / "trained", feature_kinds=("encoder", "flowfeat"), **common
    )
    timings["eval_trained_s"] = time.perf_counter() - start
    start = time.perf_counter()
    untrained_scores = features_lib.evaluate_davis(
        untrained, davis_root, out_dir / "eval" / "untrained", feature_kinds=("flowfeat",), **common
    )
    timings["eval_untrained_s"] = time.perf_counter() - start
    results = {"encoder": scores["encoder"], "untrained": untrained_scores["flowfeat"], "flowfeat": scores["flowfeat"]}

    out_dir.mkdir(parents=True, exist_ok=True)
    table = results_markdown(results)
    (out_dir / "table.md").write_text(table + "\n")
    with (out_dir / "table.csv").open("w") as f:
        f.write("features,protocol,JF_mean,J_mean,F_mean\n")
        for row, by_protocol in results.items():
            for protocol, s in by_protocol.items():
                f.write(f"{row},{protocol},{s['JF_mean']:.6f},{s['J_mean']:.6f},{s['F_mean']:.6f}\n")
    bar_chart(
        results,
        out_dir / "bar_chart.png",
        title=f"DAVIS-2016 {split} ({len(sequences)} sequences), FlowFeat after {step} steps",
    )
    loss_curve(workdir / "metrics.jsonl", out_dir / "loss.png", keys=("loss", "grad_loss"))

    multiple, short_side = features_lib.davis_input_geometry(trained.cfg.encoder.patch_size, config.eval.short_side)
    picks = sequences[:: max(1, len(sequences) // pca_sequences)][:pca_sequences]
    frames = [davis.read_frames(davis_root, s, max_frames=1)[0] for s in picks]
    sizes = [davis.davis_input_size(*f.shape[:2], multiple=multiple, short_side=short_side) for f in frames]
    viz.save_png(out_dir / "pca.png", pca_comparison({"untrained": untrained, "flowfeat": trained}, frames, sizes))

    facts = {
        "step": step,
        "decoder": config.eval.decoder,
        "sequences": sequences,
        "split": split,
        "protocols": list(protocols),
        "short_side": short_side,
        "max_frames": config.eval.max_frames,
        "timings": timings,
        "results": results,
    }
    (out_dir / "results.json").write_text(json.dumps(facts, indent=2) + "\n")
    return results
