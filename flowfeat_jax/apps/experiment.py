"""The DAVIS "does it learn" experiment: train FlowFeat, then score three kinds of features on the same sequences.

Rows of the comparison (same config, same seed, so all three share one frozen encoder):
- "encoder": the encoder's final-LayerNorm patch features (`FlowFeat.encode(...).final`);
- "untrained": the decoder as initialised, before any step (`build.build_flowfeat`): what the DPT architecture alone
  adds to the encoder, the control that shows whether training is what makes a difference;
- "flowfeat": the trained run's online decoder (`inference.load_flowfeat`), the model the reference validates and
  releases (recipe.md step 12); `--config.eval.decoder=ema` scores the EMA teacher instead.
Each row goes through `eval.features.evaluate_davis` (label propagation "knn" and the first-frame linear probe).
The outputs are a Markdown/CSV table, a bar chart of J&F, J and F per protocol, a PCA picture of the three feature
kinds on the same frames, and a loss curve of the run, drawn with PIL (no matplotlib).
"""

from __future__ import annotations

import copy
import dataclasses
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
from flowfeat_jax.ports import build
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
    untrained, _ = build.build_flowfeat(config.model, config.seed)
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


# --------------------------------------------------------------------------------------------------------------------
# The Tab. 3 ablation sweep: every setting x seed trained and scored the same way (issue 22)
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ablation:
    label: str
    overrides: dict  # config keys as written on the command line -> value
    paper_delta: float | None  # the paper's Tab. 3 change of DAVIS J&F in points (DINOv2-S/14, YouTube-VOS)


ABLATIONS = {
    "full": Ablation("full (released loss, ridge map)", {}, 0.0),
    "ridge_alpha_1e-3": Ablation("ridge alpha 1e-3", {"loss.ridge_alpha": 1e-3}, -7.6),
    "no_grad_loss": Ablation("no L_grad", {"loss.grad_weight": 0.0}, -1.5),
    "l2": Ablation("L2 instead of L1", {"loss.flow": "l2"}, -2.4),
    "no_l1": Ablation("no L_L1", {"loss.flow_weight": 0.0}, -0.5),
    "naive_linear": Ablation("naive single linear layer", {"loss.flow_map": "linear"}, -9.1),
    "next_frame": Ablation("next-frame pairs only", {"data.gap": 1, "data.timeflip": False}, 0.0),
}
# Per seed, from the untrained model of that seed (no training): its encoder features and its initial decoder.
CONTROLS = {"encoder": "encoder features (control)", "untrained": "untrained decoder (control)"}
SweepRow = dict[str, dict[str, list[float]]]  # {protocol: [J&F per seed]}


def ablation_config(config: ml_collections.ConfigDict, name: str, seed: int, records_root: pathlib.Path):
    """`config` with the ablation's overrides and `seed`; runs with the same export parameters share one flow
    export under `records_root` (the exported flow does not depend on the seed or the loss)."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
    run = copy.deepcopy(config)
    run.update_from_flattened_dict(dict(ABLATIONS[name].overrides, seed=seed))
    if run.data.source == "records" and not run.data.records:
        run.data.records = str(records_root / f"gap{run.data.gap}")
    return run


def _cached_scores(path: pathlib.Path, settings: dict) -> dict | None:
    """The scores a run wrote for exactly these evaluation settings, else None (evaluated again)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("settings") == settings else None


def run_ablation_sweep(
    config: ml_collections.ConfigDict,
    sweep_dir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    davis_root: str | pathlib.Path,
    *,
    ablations: Sequence[str] = tuple(ABLATIONS),
    seeds: Sequence[int] = (0, 1, 2),
    split: str = "val",
    sequences: Sequence[str] | None = None,
    protocols: Sequence[str] = ("knn", "linear"),
) -> dict:
    """Trains every ablation x seed in `sweep_dir/<ablation>/seed<k>` (resuming or reusing what is there), scores
    each trained online decoder, and per seed the controls; writes the table, chart and results.json into `out_dir`.

    Resumable per run: a finished run is not trained again, and scores are kept in `<run>/scores.json` beside the
    settings they were computed with (other settings -> scored again).
    """
    if "full" not in ablations:
        raise ValueError("the sweep needs the 'full' row (every delta is taken against it)")
    if not seeds:
        raise ValueError("the sweep needs at least one seed")
    for name in ablations:
        ablation_config(config, name, 0, pathlib.Path())  # unknown names and bad overrides fail before any work
    sweep_dir, out_dir = pathlib.Path(sweep_dir), pathlib.Path(out_dir)
    sequences = list(sequences) if sequences else davis.list_sequences(davis_root, split)
    settings = {
        "split": split,
        "sequences": sequences,
        "protocols": list(protocols),
        "short_side": config.eval.short_side,
        "max_frames": config.eval.max_frames or None,
        "decoder": config.eval.decoder,
    }
    eval_kwargs = {k: v for k, v in settings.items() if k != "decoder"}
    rows: dict[str, SweepRow] = {name: {p: [] for p in protocols} for name in (*ablations, *CONTROLS)}
    runs, control_s = [], []
    total = len(ablations) * len(seeds)
    for seed in seeds:
        control_path = sweep_dir / "controls" / f"seed{seed}" / "scores.json"
        controls = _cached_scores(control_path, settings)
        if controls is None:
            start = time.perf_counter()
            untrained, _ = build.build_flowfeat(config.model, seed)
            scores = features_lib.evaluate_davis(
                untrained, davis_root, control_path.parent / "eval", feature_kinds=("encoder", "flowfeat"),
                **eval_kwargs,
            )
            controls = {"settings": settings, "scores": {"encoder": scores["encoder"], "untrained": scores["flowfeat"]},
                        "eval_s": time.perf_counter() - start}
            control_path.write_text(json.dumps(controls, indent=2) + "\n")
        control_s.append(controls["eval_s"])
        for row in CONTROLS:
            for p in protocols:
                rows[row][p].append(controls["scores"][row][p]["JF_mean"])
        for name in ablations:
            run_config = ablation_config(config, name, seed, sweep_dir / "flow")
            run_dir = sweep_dir / name / f"seed{seed}"
            scores_path = run_dir / "scores.json"
            record = _cached_scores(scores_path, settings)
            if record is None or record.get("step") != run_config.train.num_steps:
                start = time.perf_counter()
                loop.train(run_config, run_dir)
                train_s = time.perf_counter() - start
                model, _, step = inference.load_flowfeat(run_dir, decoder=config.eval.decoder)
                start = time.perf_counter()
                scores = features_lib.evaluate_davis(model, davis_root, run_dir / "eval", **eval_kwargs)
                record = {"settings": settings, "step": step, "scores": scores["flowfeat"], "train_s": train_s,
                          "eval_s": time.perf_counter() - start}
                scores_path.write_text(json.dumps(record, indent=2) + "\n")
            for p in protocols:
                rows[name][p].append(record["scores"][p]["JF_mean"])
            runs.append({"ablation": name, "seed": seed, **{k: record[k] for k in ("step", "train_s", "eval_s")},
                         "JF": {p: record["scores"][p]["JF_mean"] for p in protocols}})
            print(f"[{len(runs)}/{total}] {name} seed {seed}: " + ", ".join(
                f"{p} J&F {record['scores'][p]['JF_mean']:.3f}" for p in protocols), flush=True)

    summary = summarize_sweep(rows, protocols)
    wall_s = sum(r["train_s"] + r["eval_s"] for r in runs) + sum(control_s)
    caption = sweep_caption(config, seeds, sequences, split, wall_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablations.md").write_text(caption + "\n\n" + sweep_markdown(summary, protocols) + "\n")
    with (out_dir / "ablations.csv").open("w") as f:
        f.write("setting,seed,protocol,JF_mean\n")
        for name, by_protocol in rows.items():
            for p, values in by_protocol.items():
                for seed, value in zip(seeds, values):
                    f.write(f"{name},{seed},{p},{value:.6f}\n")
    sweep_chart(summary, protocols, out_dir / "ablations.png", title=f"DAVIS-2016 {split}: J&F over {len(seeds)} seeds")
    facts = {"settings": settings, "seeds": list(seeds), "num_steps": config.train.num_steps,
             "batch_size": config.train.batch_size, "wall_s": wall_s, "runs": runs, "summary": summary,
             "caption": caption}
    (out_dir / "ablations.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def _sample_sd(values: np.ndarray) -> float:
    """The sample standard deviation (ddof 1) over seeds; 0 for a single seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize_sweep(rows: dict[str, SweepRow], protocols: Sequence[str]) -> dict:
    """Per row and protocol, in J&F points (x100): per-seed values, mean, sample sd, and the paired difference to
    'full' of the same seed (the rows of one seed share the encoder, the data order and the crops) with its sd."""
    summary = {}
    for name, by_protocol in rows.items():
        summary[name] = {}
        for p in protocols:
            values = 100 * np.asarray(by_protocol[p], float)
            delta = values - 100 * np.asarray(rows["full"][p], float)
            summary[name][p] = {"values": values.round(3).tolist(), "mean": float(values.mean()),
                                "sd": _sample_sd(values), "delta": float(delta.mean()), "delta_sd": _sample_sd(delta)}
    return summary


def sweep_caption(config: ml_collections.ConfigDict, seeds: Sequence[int], sequences: Sequence[str], split: str,
                  wall_s: float) -> str:
    frames = f"first {config.eval.max_frames} frames" if config.eval.max_frames else "all frames"
    return (
        f"DAVIS-2016 {split} ({len(sequences)} sequences, {frames}, short side {config.eval.short_side}); "
        f"{config.train.num_steps} steps of batch {config.train.batch_size} per run, seeds {', '.join(map(str, seeds))}"
        f" (the seed sets the random encoder, the decoder init, the data order and the crops); J&F x 100, mean +- sd "
        f"over seeds; delta = paired difference to 'full' of the same seed, mean +- sd. Wall time of the sweep: "
        f"{wall_s / 60:.0f} min."
    )


def sweep_markdown(summary: dict, protocols: Sequence[str]) -> str:
    header = "| setting | paper Δ (Tab. 3) | " + " | ".join(f"{p} J&F | {p} Δ" for p in protocols) + " |"
    lines = [header, "| --- | ---: |" + " ---: | ---: |" * len(protocols)]
    for name, by_protocol in summary.items():
        ablation = ABLATIONS.get(name)
        label = ablation.label if ablation else CONTROLS[name]
        paper = "" if ablation is None else (
            "0" if name == "full" else f"{ablation.paper_delta:+.1f}" if ablation.paper_delta else "±0")
        cells = []
        for p in protocols:
            s = by_protocol[p]
            cells += [f"{s['mean']:.1f} ± {s['sd']:.1f}", "" if name == "full" else f"{s['delta']:+.1f} ± {s['delta_sd']:.1f}"]
        lines.append(f"| {label} | {paper} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_chart(summary: dict, protocols: Sequence[str], path: str | pathlib.Path, *, title: str = "") -> None:
    """One panel per protocol: a bar per setting (mean J&F x 100), a whisker of +-1 sd and a dot per seed."""
    names = list(summary)
    label_w, bar_h, gap, top, panel_w, margin = 230, 16, 8, 40, 300, 30
    height = top + len(names) * (bar_h + gap) + 40
    width = label_w + len(protocols) * (panel_w + margin) + 10
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    high = max(max(v["values"]) for by_p in summary.values() for v in by_p.values())
    scale = panel_w / max(10.0, 10 * np.ceil(high / 10))
    for r, name in enumerate(names):
        label = ABLATIONS[name].label if name in ABLATIONS else CONTROLS[name]
        _text(draw, (label_w - 6, top + r * (bar_h + gap) + bar_h / 2), label, anchor="rm")
    for i, p in enumerate(protocols):
        x0 = label_w + i * (panel_w + margin)
        _text(draw, (x0, top - 16), f"{p} J&F x 100")
        for tick in np.arange(0, panel_w / scale + 1e-6, 10):
            x = x0 + tick * scale
            draw.line([(x, top - 4), (x, height - 30)], fill=(225, 225, 225))
            _text(draw, (x, height - 26), f"{tick:.0f}", anchor="ma")
        for r, name in enumerate(names):
            s = summary[name][p]
            y = top + r * (bar_h + gap)
            colour = ROW_COLOURS["flowfeat"] if name == "full" else (
                (200, 200, 200) if name in CONTROLS else (230, 159, 0))
            draw.rectangle([x0, y, x0 + s["mean"] * scale, y + bar_h], fill=colour)
            lo, hi = (s["mean"] - s["sd"]) * scale, (s["mean"] + s["sd"]) * scale
            draw.line([(x0 + lo, y + bar_h / 2), (x0 + hi, y + bar_h / 2)], fill=(0, 0, 0), width=1)
            for value in s["values"]:
                cx = x0 + value * scale
                draw.ellipse([cx - 2, y + bar_h / 2 - 2, cx + 2, y + bar_h / 2 + 2], fill=(0, 0, 0))
        draw.line([(x0, top - 4), (x0, height - 30)], fill=(0, 0, 0))
    _text(draw, (10, 8), title or "ablations")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
