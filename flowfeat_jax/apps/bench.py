"""Speed, FLOPs and memory of the FlowFeat train step and forward, JAX and (optionally) torch in one process (issue 9).

JAX: the real jitted step of train/step.py (state donated) on a fixed synthetic batch of the config's frame and flow
sizes, compiled ahead of time (`lower().compile()`, timed as compile_s) so XLA's cost analysis gives the FLOPs; the
FlowFeat forward jitted at batch 1 and batch B. Torch: the torch FlowFeat of torch_ref/flowfeat.py with the same
weights (ports.flowfeat export) for the forward, and torch_ref/train.py (eager fp32, as released) for the step, fed
the same frames, flow and crop thetas. JAX and torch calls are interleaved iteration by iteration so a changing
machine load hits both alike; every timed call waits for its result (block_until_ready / device sync).

    result = run_benchmark(config.load_config("demo"), batch=4, size=(112, 112), dtype="f32", with_torch=True, steps=10)
    print(format_table(result))
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flowfeat_jax import errors
from flowfeat_jax.data import pipeline, records
from flowfeat_jax.models.vit import IMAGENET_MEAN, IMAGENET_STD, ViTConfig
from flowfeat_jax.ports import build
from flowfeat_jax.train import loop
from flowfeat_jax.train import step as step_lib

DTYPES = {"f32": "float32", "bf16": "bfloat16"}
WARMUP_CALLS = 2
METRIC_KEYS = (
    "compile_s", "train_step_ms", "train_img_per_s", "infer_ms", "infer_ms_batch", "peak_mem_mb", "flops_per_img",
    "mfu", "infer_mem_mb",
)

# Dense peak FLOP/s per chip (vendor datasheets, no sparsity), by a substring of jax's device_kind; more specific
# names first. 'tf32' is what XLA uses for f32 matmuls on these GPUs unless the matmul precision is raised.
PEAK_FLOPS = (
    ("H100 PCIe", {"bfloat16": 756e12, "tf32": 378e12, "float32": 51.2e12}),
    ("H100", {"bfloat16": 989e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("H200", {"bfloat16": 989e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("A100", {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
)


def peak_flops(device_kind: str, dtype: str, *, tf32: bool) -> tuple[float | None, str | None]:
    """(peak FLOP/s, basis) of a chip for a compute dtype ('float32' | 'bfloat16'); (None, None) when unknown (CPU).

    `tf32`: f32 matmuls run on TF32 tensor cores (XLA's default on these GPUs; torch's only with allow_tf32).
    """
    for name, table in PEAK_FLOPS:
        if name in device_kind:
            basis = "bfloat16" if dtype == "bfloat16" else "tf32" if tf32 else "float32"
            return table[basis], basis
    return None, None


def jax_uses_tf32() -> bool:
    """Whether XLA may run f32 matmuls in TF32 (its GPU default unless the matmul precision is raised)."""
    return jax.config.jax_default_matmul_precision not in ("highest", "float32")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median and spread of the wall time of repeated calls, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    count: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        ms = np.asarray(seconds) * 1e3
        return cls(float(np.median(ms)), float(np.percentile(ms, 10)), float(np.percentile(ms, 90)), len(ms))


def interleaved_timings(calls: dict[str, Callable[[], Any]], iters: int, warmup: int = WARMUP_CALLS) -> dict:
    """{name: Timing} of `iters` calls of each function, run round-robin (a, b, a, b, ...) after `warmup` calls each.

    Each function must wait for its own result (block_until_ready / device sync).
    """
    if iters < 1:
        raise ValueError(f"steps must be >= 1, got {iters}")
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples = {name: [] for name in calls}
    for _ in range(iters):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing.of(s) for name, s in samples.items()}


def xla_flops(compiled) -> float | None:
    """Total FLOPs of a compiled XLA computation from its cost analysis (None where the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def xla_memory_mb(compiled) -> float | None:
    """Device memory a compiled computation needs (arguments + outputs + temporaries, XLA's memory analysis), MiB:
    the peak of that call alone, unlike the process-wide peak of `jax_peak_memory_mb`."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    total = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    return (total - analysis.alias_size_in_bytes) / 2**20


def rss_high_water_reset() -> None:
    """Restart the process's resident-set high-water mark (Linux /proc/self/clear_refs; a no-op elsewhere)."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_peak_rss(calls: Sequence[Callable[[], Any]]) -> dict[str, float | None]:
    """Process peak RSS (MiB) while running `calls` once each, and its rise over the RSS before them (Linux only)."""
    rss_high_water_reset()
    before = _proc_status_mb("VmRSS")
    for call in calls:
        call()
    peak = _proc_status_mb("VmHWM")
    rise = max(peak - before, 0.0) if peak and before else None  # RSS read just after the reset may exceed VmHWM
    return {"peak_rss_mb": peak, "peak_rss_rise_mb": rise}


def jax_peak_memory_mb(device: jax.Device) -> float | None:
    """Peak bytes in use on an accelerator (memory_stats), MiB; None where the backend keeps no stats (CPU)."""
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**20 if peak else None


def bench_config(config: ml_collections.ConfigDict, *, batch: int | None, size: Sequence[int] | None,
                 dtype: str | None) -> tuple[ml_collections.ConfigDict, list[str]]:
    """A copy of `config` at the benchmark's batch, crop size and dtype, with an encoder that can be built offline.

    The crop side is `size` (square for the train step); frame and flow sides keep the config's ratio to the crop
    (448/224 and 224/224 as released). A hub-name encoder becomes a random init of the same `encoder_arch` (speed
    does not depend on the weights), whose position table is resized as torch hub does (pos_interp='hub') so that
    the torch FlowFeat computes the same features and runs with and without --torch time the same JAX program; a
    local encoder directory is loaded as it is.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    notes = []
    if config.model.encoder and not pathlib.Path(config.model.encoder).is_dir():
        notes.append(f"encoder {config.model.encoder!r} replaced by a random init of {config.model.encoder_arch} "
                     "(same architecture; no download)")
        config.model.encoder = ""
    if not config.model.encoder and hasattr(build.encoder_config(config.model), "pos_interp"):
        config.model.pos_interp = "hub"
        notes.append("position tables resized as torch hub does (pos_interp='hub'), as the torch FlowFeat")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        config.model.dtype = DTYPES[dtype]
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        config.train.batch_size = batch
    if size is not None:
        height, width = (int(s) for s in size)
        if height != width:
            raise ValueError(f"the train step crops squares: size must be H H, got {height} {width}")
        crop = config.train.input_size
        config.data.frame_size = round(config.data.frame_size * height / crop)
        config.data.flow_size = round(config.data.flow_size * height / crop)
        config.train.input_size = height
    return config, notes


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 frames and normalised-unit flow of the config's batch, frame and flow sizes."""
    rng = np.random.default_rng(seed)
    b, s, f = config.train.batch_size, config.data.frame_size, config.data.flow_size
    return {
        "frame": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
        "flow": rng.normal(0.0, 0.05, (b, f, f, 2)).astype(np.float32),
    }


def step_crop_thetas(state: step_lib.TrainState, batch_size: int, frame_side: int, crop_scale) -> tuple:
    """The two crop thetas train/step.py draws at `state.step` (same keys), as numpy, for the torch step."""
    return tuple(np.asarray(theta) for theta in step_lib.step_crops(state, batch_size, frame_side, crop_scale))


class JaxSide:
    """Built model, train state, AOT-compiled step and forwards of one config."""

    def __init__(self, config: ml_collections.ConfigDict, infer_hw: tuple[int, int]):
        self.config = config
        self.model, self.encoder_source = build.build_flowfeat(config.model, config.seed)
        graphdef, model_state = nnx.split(self.model)
        pure = nnx.to_pure_dict(model_state)
        self.encoder_params = pure["encoder"]
        tx = loop.make_optimizer(config.train, config.model.random_decoder)
        self.state = loop.init_train_state(pure["decoder"], tx, config.seed)
        # The crops the first step draws, for the torch step (taken now: the step donates `state`).
        self.thetas = step_crop_thetas(self.state, config.train.batch_size, config.data.frame_size,
                                       tuple(config.train.crop_scale))
        self.host_batch = synthetic_batch(config)
        self.batch = jax.device_put(self.host_batch)
        step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, loop.step_config(config)))
        start = time.perf_counter()
        self.train_step = step.lower(self.state, self.batch, self.encoder_params).compile()
        self.compile_s = time.perf_counter() - start
        self.train_flops = xla_flops(self.train_step)

        forward = jax.jit(lambda params, images: nnx.merge(graphdef, params)(images))
        rng = np.random.default_rng(1)
        b = config.train.batch_size
        self.images = {n: jnp.asarray(rng.standard_normal((n, *infer_hw, 3), np.float32)) for n in sorted({1, b})}
        # The forward's own decoder copy: the step donates (deletes) the arrays of `state.params`.
        self.params = {"encoder": self.encoder_params, "decoder": jax.tree.map(jnp.copy, pure["decoder"])}
        self.forward, self.forward_flops, self.forward_compile_s, self.forward_memory_mb = {}, {}, {}, {}
        for n, images in self.images.items():
            start = time.perf_counter()
            self.forward[n] = forward.lower(self.params, images).compile()
            self.forward_compile_s[n] = time.perf_counter() - start
            self.forward_flops[n] = xla_flops(self.forward[n])
            self.forward_memory_mb[n] = xla_memory_mb(self.forward[n])

    def step(self) -> dict:
        self.state, metrics = self.train_step(self.state, self.batch, self.encoder_params)
        return jax.block_until_ready((self.state, metrics))[1]

    def infer(self, n: int) -> None:
        jax.block_until_ready(self.forward[n](self.params, self.images[n]))


class TorchSide:
    """The torch FlowFeat with the JAX model's weights, its reference train step, and the same inputs (NCHW)."""

    def __init__(self, jax_side: JaxSide, device: str, autocast: bool = False):
        # torch (and the torch-side modules, which import it) only for --torch: a JAX-only run never loads it.
        import torch

        from flowfeat_jax.ports import flowfeat as flowfeat_ports
        from flowfeat_jax.torch_ref import flowfeat as torch_flowfeat
        from flowfeat_jax.torch_ref import train as torch_train

        self.torch, self.device = torch, torch.device(device)
        self.autocast = autocast  # bf16 autocast around forward and loss (the ridge stays f32); off = fp32 as released
        config = jax_side.config
        if not isinstance(jax_side.model.cfg.encoder, ViTConfig):
            raise errors.UserError(f"--torch needs a DINO / DINOv2 / MAE ViT encoder, not {config.model.encoder_arch}")
        weights = {k: np.array(v) for k, v in flowfeat_ports.flowfeat_state_dict(jax_side.model).items()}
        heads = jax_side.model.cfg.encoder.num_heads
        self.model = torch_flowfeat.load_torch_flowfeat(weights, heads).to(self.device).eval()
        trained = torch_flowfeat.load_torch_flowfeat(weights, heads).to(self.device)
        cfg = torch_train.TorchStepConfig.from_sections(config.train, config.loss, config.ema)
        self.trainer = torch_train.TorchFlowFeatTrainer(trained, cfg)
        host = jax_side.host_batch
        frames = host["frame"].astype(np.float32) / 255.0
        frames = (frames - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
        self.frames = self._tensor(frames.transpose(0, 3, 1, 2))
        self.flow = self._tensor(host["flow"].transpose(0, 3, 1, 2))
        self.theta1, self.theta2 = (self._tensor(t) for t in jax_side.thetas)
        self.images = {n: self._tensor(np.asarray(x).transpose(0, 3, 1, 2)) for n, x in jax_side.images.items()}

    def _tensor(self, array: np.ndarray):
        return self.torch.from_numpy(np.array(array, np.float32)).to(self.device)  # a writable copy

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.autocast)

    def step(self) -> dict:
        with self._autocast():
            terms = self.trainer.step(self.frames, self.flow, self.theta1, self.theta2)
        self.sync()
        return terms

    def infer(self, n: int) -> None:
        with self.torch.inference_mode(), self._autocast():
            self.model(self.images[n])
        self.sync()

    def flops(self, call: Callable[[], None]) -> float | None:
        """FLOPs torch's FlopCounterMode counts for one call (matmuls, convs, attention)."""
        from torch.utils.flop_counter import FlopCounterMode  # torch: only for --torch

        counter = FlopCounterMode(display=False)
        with counter:
            call()
        return float(counter.get_total_flops()) or None

    def peak_memory_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated(self.device) / 2**20


def xla_thread_count() -> int:
    """Threads XLA's CPU client uses for one computation: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _side_metrics(batch: int, train: Timing, infer: Timing, infer_batch: Timing, compile_s, peak_mem_mb,
                  train_flops, peak) -> dict:
    img_per_s = batch / (train.median_ms / 1e3)
    flops_per_img = train_flops / batch if train_flops else None
    return {
        "compile_s": compile_s,
        "train_step_ms": train.median_ms,
        "train_img_per_s": img_per_s,
        "infer_ms": infer.median_ms,
        "infer_ms_batch": infer_batch.median_ms,
        "peak_mem_mb": peak_mem_mb,
        "flops_per_img": flops_per_img,
        "mfu": flops_per_img * img_per_s / peak if (peak and flops_per_img) else None,
        "train_step_ms_p10": train.p10_ms,
        "train_step_ms_p90": train.p90_ms,
        "infer_ms_p10": infer.p10_ms,
        "infer_ms_p90": infer.p90_ms,
        "infer_ms_batch_p10": infer_batch.p10_ms,
        "infer_ms_batch_p90": infer_batch.p90_ms,
        "timed_calls": train.count,
    }


def run_benchmark(config: ml_collections.ConfigDict, *, batch: int | None = None, size: Sequence[int] | None = None,
                  dtype: str | None = None, with_torch: bool = False, steps: int = 10,
                  config_name: str = "", torch_autocast: bool = False) -> dict:
    """Benchmarks one config; returns the result dict (schema in tools/benchmark.py). `size` (H, W) defaults to the
    config's crop side, `batch` and `dtype` to the config's; `torch_autocast` runs the torch side under bf16
    autocast instead of the released fp32."""
    config, notes = bench_config(config, batch=batch, size=size, dtype=dtype)
    batch, side = config.train.batch_size, config.train.input_size
    dtype_name = {v: k for k, v in DTYPES.items()}.get(config.model.dtype, config.model.dtype)
    device = jax.devices()[0]
    threads = xla_thread_count()
    peak, peak_basis = peak_flops(device.device_kind, config.model.dtype, tf32=jax_uses_tf32())

    jax_side = JaxSide(config, (side, side))
    calls = {"jax_step": jax_side.step}
    torch_side = None
    if with_torch:
        import torch  # only for --torch

        torch.set_num_threads(threads)
        torch_device = "cuda" if device.platform == "gpu" and torch.cuda.is_available() else "cpu"
        torch_side = TorchSide(jax_side, torch_device, autocast=torch_autocast)
        calls["torch_step"] = torch_side.step
        if torch_autocast:
            notes.append("the torch side runs under bf16 autocast (ridge solve in f32)")
        elif config.model.dtype != "float32":
            notes.append("the torch side runs in float32 (the released recipe); only JAX uses " + config.model.dtype)
    # The first step of each side starts from the same weights, batch and crops: its losses must agree.
    first_loss = {name: float(call()["loss"]) for name, call in calls.items()}
    train_t = interleaved_timings(calls, steps, warmup=WARMUP_CALLS - 1)
    infer_t = interleaved_timings({"jax": lambda: jax_side.infer(1)}
                                  | ({"torch": lambda: torch_side.infer(1)} if torch_side else {}), steps)
    infer_b_t = interleaved_timings({"jax": lambda: jax_side.infer(batch)}
                                    | ({"torch": lambda: torch_side.infer(batch)} if torch_side else {}), steps)

    # Peak resident memory per side, measured in its own phase (both models stay loaded: a shared baseline).
    jax_rss = measure_peak_rss([jax_side.step, lambda: jax_side.infer(batch)])
    jax_result = _side_metrics(batch, train_t["jax_step"], infer_t["jax"], infer_b_t["jax"], jax_side.compile_s,
                               jax_peak_memory_mb(device), jax_side.train_flops, peak)
    forward_flops = jax_side.forward_flops[batch]
    jax_result.update(
        **jax_rss,
        infer_flops_per_img=forward_flops / batch if forward_flops else None,
        infer_compile_s=jax_side.forward_compile_s[batch],
        infer_mem_mb=jax_side.forward_memory_mb[1],
        first_loss=first_loss["jax_step"],
    )
    result = {
        "device": f"{device.platform}:{device.device_kind}",
        "config": config_name,
        "batch": batch,
        "size": [side, side],
        "dtype": dtype_name,
        "jax": jax_result,
        "threads": threads,
        "load_avg": list(os.getloadavg()),
        "frame_size": config.data.frame_size,
        "flow_size": config.data.flow_size,
        "encoder": jax_side.encoder_source,
        "peak_flops": peak,
        "peak_flops_basis": peak_basis,
        "notes": notes,
    }
    if torch_side is not None:
        torch_rss = measure_peak_rss([torch_side.step, lambda: torch_side.infer(batch)])
        train_flops = torch_side.flops(torch_side.step)
        infer_flops = torch_side.flops(lambda: torch_side.infer(batch))
        torch_peak = None
        if torch_side.device.type == "cuda":
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch_peak = peak_flops(torch.cuda.get_device_name(torch_side.device), "float32", tf32=tf32)[0]
        torch_result = _side_metrics(batch, train_t["torch_step"], infer_t["torch"], infer_b_t["torch"], None,
                                     torch_side.peak_memory_mb(), train_flops, torch_peak)
        torch_result.update(
            **torch_rss,
            infer_flops_per_img=infer_flops / batch if infer_flops else None,
            device=str(torch_side.device),
            dtype="bf16-autocast" if torch_autocast else "f32",
            first_loss=first_loss["torch_step"],
        )
        result["torch"] = torch_result
    result["load_avg_end"] = list(os.getloadavg())
    return result


def pipeline_rates(records_dir: str | os.PathLike, *, batch_size: int, worker_counts: Sequence[int],
                   num_batches: int, read_threads: int = 2) -> list[dict]:
    """Samples/s of the training input pipeline (grain over the ArrayRecord export, data/pipeline.py) per worker count:
    `num_batches` batches timed after one warm-up batch (worker start-up and first reads excluded); in-process
    (0 workers) also samples per CPU-second of this process."""
    rows = []
    for workers in worker_counts:
        dataset = pipeline.make_pair_dataset(records_dir, batch_size=batch_size, seed=0, worker_count=workers,
                                             read_threads=read_threads, shard_index=0, shard_count=1)
        iterator = iter(dataset)
        next(iterator)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(num_batches):
            next(iterator)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        samples = batch_size * num_batches
        row = {"workers": workers, "read_threads": read_threads, "batch": batch_size, "batches": num_batches,
               "samples_per_s": samples / seconds}
        if workers == 0:  # all the work is this process's: its CPU time gives the rate per core, whatever the load
            row["samples_per_cpu_s"] = samples / cpu_seconds
        rows.append(row)
        del iterator
    return rows


def sample_stage_ms(records_dir: str | os.PathLike, count: int = 64) -> dict[str, float]:
    """Milliseconds of CPU time per sample of each stage of `FlowPairSampler.read`, in this process: the record
    reads, the JPEG decode of the frame, the flow decode (CPU time, so a busy machine does not inflate it)."""
    opened = records.open_flow_records(records_dir)
    frames = grain.sources.ArrayRecordDataSource(list(opened.frame_files))
    flows = grain.sources.ArrayRecordDataSource(list(opened.flow_files))
    stages = {"read_frame_record": [], "decode_jpeg": [], "read_flow_record": [], "decode_flow": []}
    clock = time.thread_time
    for index in range(min(count, len(frames), len(flows))):
        start = clock()
        _, jpeg = records.decode_record(frames[index])
        stages["read_frame_record"].append(clock() - start)
        start = clock()
        pipeline.decode_jpeg(jpeg)
        stages["decode_jpeg"].append(clock() - start)
        start = clock()
        _, flow = records.decode_record(flows[index])
        stages["read_flow_record"].append(clock() - start)
        start = clock()
        records.decode_flow(flow, opened.flow_size)
        stages["decode_flow"].append(clock() - start)
    return {name: float(np.mean(times) * 1e3) for name, times in stages.items()}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e9:
        return f"{value / 1e9:.2f}G"
    return f"{value:.4g}"


def format_table(result: dict) -> str:
    """A plain-text table of the main numbers (and torch/JAX ratios when torch ran)."""
    sides = [s for s in ("jax", "torch") if s in result]
    title = (f"{result['config']}  device {result['device']}  batch {result['batch']}  size {result['size']}  "
             f"dtype {result['dtype']}  threads {result['threads']}  load {result['load_avg'][0]:.2f}")
    rows = [title]
    header = f"{'metric':<18}" + "".join(f"{s:>12}" for s in sides) + ("   torch/jax" if len(sides) == 2 else "")
    rows.append(header)
    for key in (*METRIC_KEYS, "infer_flops_per_img", "peak_rss_mb", "peak_rss_rise_mb", "first_loss"):
        values = [result[s].get(key) for s in sides]
        line = f"{key:<18}" + "".join(f"{_fmt(v):>12}" for v in values)
        if len(sides) == 2 and values[0] and values[1]:
            line += f"{values[1] / values[0]:>12.2f}"
        rows.append(line)
    rows.extend(f"note: {n}" for n in result["notes"])
    return "\n".join(rows)
