"""GPU figures for an H100/H200-class machine (run by ``benchmarks/gpu.sh``; under 10 minutes).

- MAR-B (configs/imagenet256/mar_base.yaml's model, 208M parameters) training in bf16 autocast at batch 64 per GPU:
  step time, samples/s, model FLOPs per sample (``torch.utils.flop_counter``), MFU against the GPU's dense bf16
  peak (``--peak-tflops``, default 989 = H100/H200 SXM), peak memory; also at batch 256, and both with
  ``compile: true`` (static shapes; compiled for each of its 8 masked counts before the timing);
- sampling images/s of MAR-B at batch 256, 64 AR steps, cfg 2.9, for DDPM-100 and DDPM-25 (random weights: speed only);
- caching throughput: KL-16-layout diffusers AutoencoderKL (random weights) encoding 256x256 images and their flips.

Prints one JSON document and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import torch
from compare_reference import seeds_of_every_count  # benchmarks/ is on sys.path when this script runs
from torch.utils.flop_counter import FlopCounterMode

MAR_B = dict(latent_shape=(16, 16, 16), num_classes=1000, latent_scale=0.2325, patch_size=1, width=768,
             encoder_depth=12, decoder_depth=12, num_heads=12, buffer_size=64, dropout=0.1, head_width=1024,
             head_depth=6, diffusion_batch_mul=4, num_iter=64, cfg=2.9)


def cuda_timed(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def training(batch: int, peak_tflops: float, compile_model: bool) -> dict[str, Any]:
    """MAR-B bf16 training steps; ``compile_model``: ``compile: true`` (static shapes: the masked count takes 8
    values), compiled for each of them before the timing, so the timed steps never compile."""
    from lightning_ar import MARGenerator

    torch.manual_seed(0)
    model = MARGenerator(**MAR_B, compile=compile_model).cuda().train()
    gen = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(batch, 16, 16, 16, device="cuda", generator=gen)
    labels = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(generator: torch.Generator = gen) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.diffusion_loss(latents, labels, generator=generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    if compile_model:
        torch._dynamo.reset()  # the recompile limit (8) counts the graphs of every model of a function together
        for seed in seeds_of_every_count(model, "cuda"):
            step(torch.Generator("cuda").manual_seed(seed))
    compile_seconds = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    seconds = cuda_timed(step, repeats=20, warmup=3)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        model.diffusion_loss(latents, labels, generator=torch.Generator("cuda").manual_seed(0)).backward()
    flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    return {"batch": batch, "compiled": compile_model, "compile_seconds": round(compile_seconds, 1),
            "step_ms": round(seconds * 1e3, 2),
            "samples_per_s": round(batch / seconds, 1), "tflops_per_sample": round(flops / batch / 1e12, 4),
            "achieved_tflops": round(flops / seconds / 1e12, 1), "mfu": round(flops / seconds / 1e12 / peak_tflops, 3),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


@torch.no_grad()
def sampling(batch: int) -> dict[str, Any]:
    from lightning_ar import MARGenerator

    torch.manual_seed(0)
    model = MARGenerator(**MAR_B).cuda().eval()
    labels = torch.arange(batch, device="cuda") % 1000
    out = {}
    for name, steps in (("ddpm-100", 100), ("ddpm-25", 25)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.generate(labels, num_sampling_steps=steps, generator=torch.Generator("cuda").manual_seed(0))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        out[name] = {"batch": batch, "seconds": round(seconds, 2), "images_per_s": round(batch / seconds, 2)}
    return out


def kl16_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512),
        down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * 5, sample_size=256,
    )


@torch.no_grad()
def caching(batch: int) -> dict[str, Any]:
    from lightning_ar.data.vae import encode_moments

    vae = kl16_vae().cuda().eval()
    images = torch.rand(batch, 3, 256, 256, device="cuda") * 2 - 1
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        def encode(dtype=dtype) -> None:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                encode_moments(vae, torch.cat([images, images.flip(-1)]))

        seconds = cuda_timed(encode, repeats=5)
        out[name] = {"batch_images": batch, "images_per_s": round(batch / seconds, 1)}  # each with its flip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench/gpu.json")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (TFLOP/s)")
    parser.add_argument("--phases", default="", help="comma-separated subset of the phases (default: all)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    doc: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "peak_bf16_tflops": args.peak_tflops}
    for key, fn in (("train_mar_b_bf16_b64", lambda: training(64, args.peak_tflops, False)),
                    ("train_mar_b_bf16_b256", lambda: training(256, args.peak_tflops, False)),
                    ("train_mar_b_bf16_b64_compiled", lambda: training(64, args.peak_tflops, True)),
                    ("train_mar_b_bf16_b256_compiled", lambda: training(256, args.peak_tflops, True)),
                    ("sample_mar_b_b256", lambda: sampling(256)),
                    ("cache_kl16_256px", lambda: caching(64))):
        if args.phases and key not in args.phases.split(","):
            continue
        start = time.perf_counter()
        try:
            doc[key] = fn()
        except Exception as err:  # keep the other figures when one phase fails (e.g. out of memory)
            doc[key] = {"error": f"{type(err).__name__}: {err}"}
        doc[key]["phase_seconds"] = round(time.perf_counter() - start, 1)
        torch.cuda.empty_cache()
        print(json.dumps({key: doc[key]}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
