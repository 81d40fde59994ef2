"""One-call GPU check (issue 17 item 5): train step, inference and a DAVIS-style evaluation of DINOv2-S/14 + FlowFeat,
JAX against the torch reference, in one process. `tools/gpu_check.sh` runs it; `--tiny` runs the same code on a toy
model on any CPU (the test of this module).

  (b) tools/benchmark.py's `run_benchmark` at 224: JAX f32 vs torch fp32 eager (as released) and JAX bf16 vs torch
      bf16 autocast, at batch 64 and 128; inference at batch 1 at 224 and 448 with latency and device memory;
  (c) KNN (two-stream) + linear-probe evaluation on two synthetic 480p sequences: frames/s and XLA compile count;
  (d) the wall-clock of 500 YouTube-VOS epochs (27 steps of 128 each, recipe.md step 10) at the measured step rate.
MFU is XLA cost-analysis FLOPs per image × images/s over `BF16_PEAK_FLOPS` for every row (f32 rows too, so rows
compare), besides bench.py's own per-dtype MFU.
"""

from __future__ import annotations

import contextlib
import pathlib
import tempfile
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from flowfeat_jax.apps import bench
from flowfeat_jax.config import load_config
from flowfeat_jax.eval import davis, features
from flowfeat_jax.ports import build

# Dense bf16 peak of one H100 / H200 SXM (vendor datasheet, no sparsity): the MFU denominator of every row.
BF16_PEAK_FLOPS = 989e12
YTVOS_EPOCHS, YTVOS_STEPS_PER_EPOCH = 500, 27  # recipe.md step 10: max(3471 videos, 10·128) // 128 = 27 steps

# Full run: the shapes. Tiny run: a toy encoder/decoder on a few pixels, the same code paths.
FULL = {"batches": (64, 128), "crop": 224, "infer_sides": (224, 448), "steps": 10, "eval_hw": (480, 854),
        "eval_frames": 30, "short_side": 480}
TINY = {"batches": (1,), "crop": 56, "infer_sides": (56,), "steps": 1, "eval_hw": (64, 112), "eval_frames": 3,
        "short_side": 56}
TINY_ENCODER = {"hidden_size": 48, "num_layers": 4, "num_heads": 2, "mlp_dim": 96}


def check_config(tiny: bool) -> ml_collections.ConfigDict:
    """ytvos_dinov2_s14 (DINOv2-S/14, d = 128); tiny: a 4-block width-48 encoder and d = 16."""
    config = load_config("ytvos_dinov2_s14")
    if tiny:
        for key, value in TINY_ENCODER.items():
            config.model.encoder_size[key] = value
        config.model.features = 16
    return config


def bench_rows(config: ml_collections.ConfigDict, shapes: dict) -> list[dict]:
    """run_benchmark per batch and dtype: JAX f32 with torch fp32, JAX bf16 with torch bf16 autocast."""
    rows = []
    for batch in shapes["batches"]:
        for dtype in ("f32", "bf16"):
            result = bench.run_benchmark(config, batch=batch, size=(shapes["crop"],) * 2, dtype=dtype,
                                         with_torch=True, torch_autocast=dtype == "bf16", steps=shapes["steps"],
                                         config_name="ytvos_dinov2_s14")
            jax_side, torch_side = result["jax"], result["torch"]
            rows.append({
                "batch": batch, "dtype": dtype, "device": result["device"],
                "jax_step_ms": jax_side["train_step_ms"], "jax_img_per_s": jax_side["train_img_per_s"],
                "torch_step_ms": torch_side["train_step_ms"], "torch_img_per_s": torch_side["train_img_per_s"],
                "speedup": torch_side["train_step_ms"] / jax_side["train_step_ms"],
                "jax_mfu_bf16_peak": mfu(jax_side["flops_per_img"], jax_side["train_img_per_s"]),
                "torch_mfu_bf16_peak": mfu(torch_side["flops_per_img"], torch_side["train_img_per_s"]),
                "jax_compile_s": jax_side["compile_s"], "jax_peak_mem_mb": jax_side["peak_mem_mb"],
                "torch_peak_mem_mb": torch_side["peak_mem_mb"],
                "first_loss": [jax_side["first_loss"], torch_side["first_loss"]], "full": result,
            })
    return rows


def mfu(flops_per_img: float | None, img_per_s: float) -> float | None:
    return flops_per_img * img_per_s / BF16_PEAK_FLOPS if flops_per_img else None


def inference_rows(config: ml_collections.ConfigDict, shapes: dict) -> list[dict]:
    """Batch-1 FlowFeat forward per side and dtype: median latency and XLA's device memory for the call."""
    rows = []
    for dtype in ("f32", "bf16"):
        cfg, _ = bench.bench_config(config, batch=1, size=None, dtype=dtype)
        model, _ = build.build_flowfeat(cfg.model, cfg.seed)
        graphdef, params = nnx.split(model)
        forward = jax.jit(lambda p, images: nnx.merge(graphdef, p)(images))
        for side in shapes["infer_sides"]:
            images = jnp.asarray(np.random.default_rng(side).standard_normal((1, side, side, 3), np.float32))
            compiled = forward.lower(params, images).compile()
            timing = bench.interleaved_timings(
                {"forward": lambda: jax.block_until_ready(compiled(params, images))}, 5 * shapes["steps"])["forward"]
            rows.append({"dtype": dtype, "side": side, "infer_ms": timing.median_ms, "infer_ms_p90": timing.p90_ms,
                         "mem_mb": bench.xla_memory_mb(compiled), "flops": bench.xla_flops(compiled)})
    return rows


def write_synthetic_davis(root: pathlib.Path, hw: tuple[int, int], frames: int, sequences=("synth-a", "synth-b")):
    """DAVIS-2017 layout (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt): two textured objects moving
    over a noise background, index-PNG masks (labels 1 and 2)."""
    height, width = hw
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    for index, name in enumerate(sequences):
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        background = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for t in range(frames):
            labels = np.zeros((height, width), np.uint8)
            image = background.copy()
            for label, (cy, cx, speed) in enumerate(((0.4, 0.3, 2), (0.6, 0.6, -3)), start=1):
                centre = (cy * height, cx * width + speed * t * (index + 1))
                inside = (np.abs(yy - centre[0]) < height / 6) & (np.abs(xx - centre[1]) < width / 8)
                labels[inside] = label
                image[inside] = (60 * label + 40 * np.sin(xx[inside] / 5.0)).astype(np.uint8)[:, None]
            Image.fromarray(image).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=90)
            davis.write_index_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", labels)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(sequences) + "\n")
    return list(sequences)


@contextlib.contextmanager
def count_compiles() -> Iterator[list]:
    """Collects one entry per XLA backend compilation inside the block."""
    compiles = []

    def listener(event: str, duration: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def run_davis_eval(model, root: pathlib.Path, out_dir: pathlib.Path, sequences, short_side: int) -> dict:
    """KNN (two-stream) + linear probe over `sequences` through the evaluation library; the one call to adapt when
    eval/ changes its entry point."""
    return features.evaluate_davis(model, root, out_dir, sequences=sequences, protocols=("knn", "linear"),
                                   short_side=short_side)


def eval_row(config: ml_collections.ConfigDict, shapes: dict) -> dict:
    """Times `run_davis_eval` of the f32 model on two synthetic sequences; compiles counted over the whole call."""
    cfg, _ = bench.bench_config(config, batch=1, size=None, dtype="f32")
    model, _ = build.build_flowfeat(cfg.model, cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "davis"
        sequences = write_synthetic_davis(root, shapes["eval_hw"], shapes["eval_frames"])
        start = time.perf_counter()
        with count_compiles() as compiles:
            results = run_davis_eval(model, root, pathlib.Path(tmp) / "eval", sequences, shapes["short_side"])
        seconds = time.perf_counter() - start
    frames = len(sequences) * shapes["eval_frames"]
    return {"sequences": len(sequences), "frames": frames, "frame_hw": list(shapes["eval_hw"]), "seconds": seconds,
            "frames_per_s": frames / seconds, "compiles": len(compiles), "compile_s": float(sum(compiles)),
            "scores": results}


def projection(rows: list[dict]) -> list[dict]:
    """Wall-clock of 500 YouTube-VOS epochs at each measured JAX step rate of the largest batch."""
    steps = YTVOS_EPOCHS * YTVOS_STEPS_PER_EPOCH
    largest = max(row["batch"] for row in rows)
    return [{"dtype": row["dtype"], "batch": row["batch"], "steps": steps,
             "hours": steps * row["jax_step_ms"] / 3.6e6, "torch_hours": steps * row["torch_step_ms"] / 3.6e6}
            for row in rows if row["batch"] == largest]


def run(tiny: bool) -> dict:
    shapes = TINY if tiny else FULL
    config = check_config(tiny)
    device = jax.devices()[0]
    rows = bench_rows(config, shapes)
    return {"device": f"{device.platform}:{device.device_kind}", "tiny": tiny, "bf16_peak_flops": BF16_PEAK_FLOPS,
            "train": rows, "inference": inference_rows(config, shapes), "eval": eval_row(config, shapes),
            "projection": projection(rows)}


def _fmt(value, spec=".3g") -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    lines = [f"gpu_check  device {result['device']}  tiny {result['tiny']}  MFU over {result['bf16_peak_flops']:.3g} "
             "FLOP/s (dense bf16)",
             f"{'train':<8}{'batch':>6}{'dtype':>6}{'jax ms':>10}{'torch ms':>10}{'speedup':>9}{'jax img/s':>11}"
             f"{'jax MFU':>9}{'torch MFU':>10}{'jax MiB':>9}"]
    for row in result["train"]:
        lines.append(f"{'':<8}{row['batch']:>6}{row['dtype']:>6}{row['jax_step_ms']:>10.1f}{row['torch_step_ms']:>10.1f}"
                     f"{row['speedup']:>9.2f}{row['jax_img_per_s']:>11.1f}{_fmt(row['jax_mfu_bf16_peak'], '.1%'):>9}"
                     f"{_fmt(row['torch_mfu_bf16_peak'], '.1%'):>10}{_fmt(row['jax_peak_mem_mb'], '.0f'):>9}")
    for row in result["inference"]:
        lines.append(f"{'infer':<8}{'b1':>6}{row['dtype']:>6}  side {row['side']}: {row['infer_ms']:.2f} ms "
                     f"(p90 {row['infer_ms_p90']:.2f}), memory {_fmt(row['mem_mb'], '.0f')} MiB")
    ev = result["eval"]
    lines.append(f"{'eval':<8}{ev['sequences']} sequences, {ev['frames']} frames {ev['frame_hw']}: {ev['seconds']:.1f} s, "
                 f"{ev['frames_per_s']:.2f} frames/s, {ev['compiles']} compiles ({ev['compile_s']:.1f} s)")
    for row in result["projection"]:
        lines.append(f"{'500 ep':<8}{row['batch']:>6}{row['dtype']:>6}  {row['steps']} steps: JAX {row['hours']:.2f} h, "
                     f"torch {row['torch_hours']:.2f} h")
    return "\n".join(lines)
