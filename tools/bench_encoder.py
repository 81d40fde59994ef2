"""CPU time of one DINOv2 ViT-S/14 forward (random weights) in JAX (jitted, after warm-up) and in transformers.

  OMP_WAIT_POLICY=PASSIVE python tools/bench_encoder.py --size 224 --batch 8 --repeats 3
"""

import argparse
import os
import statistics
import time

import numpy as np


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = parser.parse_args()

    import jax
    import torch
    import transformers
    from flax import nnx

    from flowfeat_jax.models.vit import ViT, ViTConfig, forward

    images = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    model = ViT(ViTConfig.dinov2_vits14(), rngs=nnx.Rngs(0))
    jax_images = jax.numpy.asarray(images)
    jax_s = _median_seconds(lambda: forward(model, jax_images).last_hidden_state.block_until_ready(), args.repeats)

    torch.set_num_threads(args.threads)
    config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                                       patch_size=14)
    torch_model = transformers.Dinov2Model(config).eval()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def torch_run():
        with torch.inference_mode():
            torch_model(pixels)

    torch_s = _median_seconds(torch_run, args.repeats)
    print(f"ViT-S/14 {args.batch}x{args.size}x{args.size}, {os.cpu_count()} cpus, torch threads {args.threads}: "
          f"jax {jax_s:.3f} s, torch {torch_s:.3f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
