"""``make bench``: this machine's speed figures for lightning-ar, measured in one process so they are comparable.

    python benchmarks/bench.py [--out outputs/bench] [--digits-ckpt CKPT] [--quick] [--no-compile | --only compiled]

Prints one JSON document and writes it to ``<out>/bench-<UTC time>.json`` and ``<out>/latest.json``:

- ``machine``: torch/CPU facts and the measured matmul throughput in fp32 and bf16 (the local ceilings);
- ``training.<config>.<precision>``: samples/s, tokens/s, model FLOPs per sample (``torch.utils.flop_counter``, forward
  and backward) and ``train_mfu`` = achieved FLOP/s / matmul ceiling of that precision, for ``digits`` (the demo
  config) and ``imagenet_small`` (256 tokens of dim 16, width 256, 4+4 blocks, head 3x512, batch 16, buffer 64);
- ``compiled_training.<config>``: eager against ``compile: true`` (inductor, fp32) training steps with every token
  masked in both (``mask_buckets: 1``: one graph), their ratio, the compile seconds and the relative loss difference
  on one fixed batch (minutes of compilation on a CPU; ``--no-compile`` skips it, ``--only compiled`` runs only it);
- ``compiled_sampling.<config>``: eager against ``compile_sampler`` generation (DDPM-100, cfg 3, 8 AR steps), seconds
  per image, their ratio, the compile seconds and the largest latent difference (skipped and run alike);
- ``sampling.<sampler>``: images/s and seconds per image of the ImageNet-shaped config at 64 AR steps with CFG;
- ``refinement``: the share of digits sampling time spent in the ``flow`` and ``amortized`` refinement at their
  defaults (a trained generator with ``--digits-ckpt``, else a random one, recorded in ``generator``);
- ``sampler_quality`` (with ``--digits-ckpt``): digits-FID, conditional accuracy and end-to-end speed of the head
  samplers against DDPM-100 on the same labels and seeds (``benchmarks/sampler_quality.py``);
- ``peak_rss_mb`` of every phase.

Compare two result files with ``make bench-compare`` (``benchmarks/compare.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

DIGITS = dict(latent_shape=(1, 8, 8), num_classes=10, patch_size=2, width=128, encoder_depth=3, decoder_depth=3,
              num_heads=4, buffer_size=4, dropout=0.0, head_width=128, head_depth=3, diffusion_batch_mul=4)
IMAGENET_SMALL = dict(latent_shape=(16, 16, 16), num_classes=1000, patch_size=1, width=256, encoder_depth=4,
                      decoder_depth=4, num_heads=4, buffer_size=64, dropout=0.0, head_width=512, head_depth=3,
                      diffusion_batch_mul=4)
CONFIGS = {"digits": (DIGITS, 32), "imagenet_small": (IMAGENET_SMALL, 16)}
SAMPLERS = {"ddpm-100": ("ddpm", 100), "ddpm-25": ("ddpm", 25), "ddpm-10": ("ddpm", 10), "dpm++-20": ("dpm++", 20)}
PRECISIONS = ("fp32", "bf16-mixed")


class PeakRSS:
    """Peak resident set size (MB) of this process while the context is open, sampled every 5 ms."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def current_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: the process-lifetime peak is the best available figure
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self.current_mb())

    def __enter__(self) -> PeakRSS:
        self.peak_mb = self.current_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = round(max(self.peak_mb, self.current_mb()), 1)


def timed(fn: Callable[[], Any], min_seconds: float, min_repeats: int = 2, warmup: int = 1) -> float:
    """Mean seconds of one ``fn()`` call after ``warmup`` calls, repeated until ``min_seconds`` have passed."""
    for _ in range(warmup):
        fn()
    count, start = 0, time.perf_counter()
    while count < min_repeats or time.perf_counter() - start < min_seconds:
        fn()
        count += 1
    return (time.perf_counter() - start) / count


def autocast(precision: str):
    """``torch.autocast`` on CPU for ``bf16-mixed``, nothing for ``fp32``."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()


def matmul_gflops(dtype: torch.dtype, n: int, min_seconds: float, trials: int = 3) -> float:
    """Best measured throughput (GFLOP/s) of ``n x n`` and ``n/2 x n/2`` matmuls in ``dtype`` over ``trials`` timings
    each: the ceiling is the best this machine reaches (one timing can be 30% low on a shared VM)."""
    gen = torch.Generator().manual_seed(0)
    best = 0.0
    for size in (n // 2, n):
        a, b = (torch.randn(size, size, generator=gen).to(dtype) for _ in range(2))
        for _ in range(trials):
            best = max(best, 2 * size**3 / timed(lambda a=a, b=b: a @ b, min_seconds / trials) / 1e9)
    return round(best, 1)


def machine(quick: bool) -> dict[str, Any]:
    n, secs = (1024, 0.5) if quick else (2048, 2.0)
    return {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "matmul_gflops": {"fp32": matmul_gflops(torch.float32, n, secs),
                          "bf16": matmul_gflops(torch.bfloat16, n, secs)},
    }


def make_generator(config: dict[str, Any], **overrides: Any):
    from lightning_ar import MARGenerator

    torch.manual_seed(0)
    return MARGenerator(**{"latent_scale": 1.0, **config, **overrides})


def train_step_fn(model, batch: int, precision: str) -> tuple[Callable[[], None], torch.Tensor, torch.Tensor]:
    """One optimizer step (forward, backward, AdamW) on a fixed random batch, as a closure."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, *model.latent_shape, generator=gen)
    labels = torch.randint(0, model.hparams.num_classes, (batch,), generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        with autocast(precision):
            loss = model.diffusion_loss(latents, labels, generator=gen)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, latents, labels


def flops_per_step(model, latents: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one forward+backward (``torch.utils.flop_counter``; matmuls and attention), seeded mask ratio."""
    counter = FlopCounterMode(display=False)
    with counter:
        model.diffusion_loss(latents, labels, generator=torch.Generator().manual_seed(0)).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def training(name: str, precision: str, ceilings: dict[str, float], quick: bool) -> dict[str, Any]:
    config, batch = CONFIGS[name]
    model = make_generator(config)
    step, latents, labels = train_step_fn(model, batch, precision)
    with PeakRSS() as rss:
        seconds = timed(step, 2.0 if quick else 8.0, warmup=2)
    flops = flops_per_step(model, latents, labels)
    tokens = model.seq_len * batch
    ceiling = ceilings["bf16" if precision == "bf16-mixed" else "fp32"]
    return {
        "batch": batch,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "step_ms": round(seconds * 1e3, 1),
        "samples_per_s": round(batch / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "gflops_per_sample": round(flops / batch / 1e9, 4),
        "achieved_gflops": round(flops / seconds / 1e9, 1),
        "train_mfu": round(flops / seconds / 1e9 / ceiling, 3),
        "peak_rss_mb": rss.peak_mb,
    }


def compiled_training(name: str, quick: bool, backend: str = "inductor") -> dict[str, Any]:
    """Eager against ``compile: true`` training steps (fp32) on one config, every token masked (``mask_buckets: 1``)
    in both, so one compiled graph serves every step; the first compiled step's seconds are the compile time."""
    config, batch = CONFIGS[name]
    steps = {}
    for mode in ("eager", "compiled"):
        model = make_generator(config, mask_buckets=1, compile=mode == "compiled",
                               compile_options={"backend": backend, "fullgraph": True})
        step, latents, labels = train_step_fn(model, batch, "fp32")
        start = time.perf_counter()  # the first forward and backward (compiled: including compilation)
        loss = model.diffusion_loss(latents, labels, generator=torch.Generator().manual_seed(0))
        loss.backward()
        model.zero_grad(set_to_none=True)
        first = time.perf_counter() - start
        steps[mode] = (timed(step, 1.0 if quick else 6.0, warmup=1), first, loss.item())
    (eager, _, loss_e), (comp, first, loss_c) = steps["eager"], steps["compiled"]
    return {"backend": backend, "batch": batch, "eager_step_ms": round(eager * 1e3, 1),
            "compiled_step_ms": round(comp * 1e3, 1), "speedup": round(eager / comp, 3),
            "compile_s": round(first - comp, 1), "loss_rel_diff": abs(loss_c - loss_e) / abs(loss_e)}


def compiled_sampling(name: str, quick: bool, backend: str = "inductor") -> dict[str, Any]:
    """Eager against ``compile_sampler`` generation (fp32, DDPM-100, cfg 3 linear, 8 AR steps; quick: DDPM-10) on one
    config with trained-like (random, non-zero) head weights; the first compiled call's extra seconds are the
    compile time, ``max_abs_diff`` compares the two samplers' latents (same seed)."""
    config, _ = CONFIGS[name]
    model = make_generator(config, num_iter=8, cfg=3.0, num_sampling_steps=10 if quick else 100).eval()
    with torch.no_grad():
        for p in model.head.parameters():  # zero-initialised modulations would make every block the identity
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    model.head.sampler_compile_options = {"backend": backend}
    labels = torch.arange(2 if quick else 8)

    def generate(compiled: bool) -> torch.Tensor:
        return model.generate(labels, compile_sampler=compiled, generator=torch.Generator().manual_seed(0),
                              progress=False)

    start = time.perf_counter()
    first = generate(True)
    first_s = time.perf_counter() - start
    seconds = {mode: timed(lambda m=mode: generate(m == "compiled"), 1.0 if quick else 4.0, warmup=0)
               for mode in ("eager", "compiled")}
    return {"backend": backend, "batch": len(labels), "eager_sec_per_image": round(seconds["eager"] / len(labels), 4),
            "compiled_sec_per_image": round(seconds["compiled"] / len(labels), 4),
            "speedup": round(seconds["eager"] / seconds["compiled"], 3),
            "compile_s": round(first_s - seconds["compiled"], 1),
            "max_abs_diff": float((first - generate(False)).abs().max())}


def sampling(quick: bool) -> dict[str, Any]:
    """Seconds per image of the ImageNet-shaped config at 64 AR steps, cfg 3 (linear), for each sampler."""
    model = make_generator(IMAGENET_SMALL, num_iter=64, cfg=3.0).eval()
    labels = torch.arange(2 if quick else 4)
    out = {}
    for name, (sampler, steps) in SAMPLERS.items():
        with PeakRSS() as rss:
            start = time.perf_counter()
            model.generate(labels, sampler=sampler, num_sampling_steps=steps,
                           generator=torch.Generator().manual_seed(0))
            seconds = time.perf_counter() - start
        out[name] = {"batch": len(labels), "sec_per_image": round(seconds / len(labels), 4),
                     "images_per_s": round(len(labels) / seconds, 3), "peak_rss_mb": rss.peak_mb}
    base = out["ddpm-100"]["sec_per_image"]
    for row in out.values():
        row["speedup_vs_ddpm100"] = round(base / row["sec_per_image"], 2)
    return out


def refinement_module(ckpt: str | None):
    """An ``OTRefinement`` on the digits generator (trained from ``ckpt`` or random) with banks filled by teacher
    forcing on the digits training split."""
    from lightning_ar import LatentDataModule, OTRefinement

    data = LatentDataModule("digits", batch_size=64)
    gen = ckpt if ckpt else make_generator(DIGITS, latent_scale=data.latent_scale, num_iter=8, cfg=3.0,
                                           num_sampling_steps=10)
    module = OTRefinement(generator=gen)
    rng = torch.Generator().manual_seed(0)
    for latents, labels in data.train_dataloader():
        module.fill_bank(module.bank, latents, labels, rng)
    return module, data


def refinement(ckpt: str | None, quick: bool) -> dict[str, Any]:
    """Share of digits sampling time spent refining, per mode, at the module's default settings, for generation
    batches of 32 (the digits configs) and 128 (the flow's cost per AR step barely depends on the batch)."""
    module, data = refinement_module(ckpt)
    _, labels = data.source.split("test")
    labels = labels[: 64 if quick else 180]
    out: dict[str, Any] = {"generator": ckpt or "random-init (pass --digits-ckpt for a trained one)",
                           "num_images": len(labels), "flow_settings": vars(module.flow),
                           "sampler": f"{module.mar_generator.hparams.sampler}-"
                                      f"{module.mar_generator.hparams.num_sampling_steps}"}
    for batch in (32, 128):
        rows = out[f"batch_{batch}"] = {}
        for mode in ("none", "flow", "amortized"):
            total = refine = 0.0
            with PeakRSS() as rss:
                for i in range(0, len(labels), batch):
                    start = time.perf_counter()
                    module.generate(labels[i : i + batch], refine=mode, generator=torch.Generator().manual_seed(i))
                    total += time.perf_counter() - start
                    refine += module.last_generation_stats["refine_seconds"]
            rows[mode] = {"sec_per_image": round(total / len(labels), 4), "refine_share": round(refine / total, 3),
                          "peak_rss_mb": rss.peak_mb}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    doc: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "quick": args.quick, "machine": machine(args.quick)}
    ceilings = doc["machine"]["matmul_gflops"]
    doc["training"] = {name: {p: training(name, p, ceilings, args.quick) for p in PRECISIONS} for name in CONFIGS}
    for name in CONFIGS:
        t = doc["training"][name]
        t["bf16_vs_fp32_throughput"] = round(t["bf16-mixed"]["samples_per_s"] / t["fp32"]["samples_per_s"], 3)
    if not args.no_compile:
        doc["compiled_training"] = {name: compiled_training(name, args.quick) for name in CONFIGS}
        doc["compiled_sampling"] = {name: compiled_sampling(name, args.quick) for name in CONFIGS}
    doc["sampling"] = sampling(args.quick)
    doc["refinement"] = refinement(args.digits_ckpt, args.quick)
    if args.digits_ckpt:
        doc["sampler_quality"] = sampler_quality(args.digits_ckpt, seeds=1 if args.quick else 3)
    return doc


def run_compiled(args: argparse.Namespace) -> dict[str, Any]:
    """Only :func:`compiled_training` and :func:`compiled_sampling` for each config (``--only compiled``)."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
            "compiled_training": {name: compiled_training(name, args.quick) for name in CONFIGS},
            "compiled_sampling": {name: compiled_sampling(name, args.quick) for name in CONFIGS}}


def sampler_quality(ckpt: str, seeds: int) -> dict[str, Any]:
    """``benchmarks/sampler_quality.py`` on the trained digits checkpoint (same labels and seeds per sampler)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sampler_quality import evaluate

    return evaluate(ckpt, seeds)


def write(doc: dict[str, Any], out_dir: Path) -> Path:
    from lightning_ar.io import atomic_write_text

    stamp = doc["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = out_dir / f"bench-{stamp}.json"
    text = json.dumps(doc, indent=2)
    atomic_write_text(path, text + "\n")
    atomic_write_text(out_dir / "latest.json", text + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench", help="folder of the result files")
    parser.add_argument("--digits-ckpt", default=None, help="trained digits MARGenerator checkpoint (refinement)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="short timings and small batches (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled training path (minutes of "
                        "compilation on a CPU)")
    parser.add_argument("--only", choices=["compiled"], default=None, help="measure only this part")
    args = parser.parse_args(argv)
    if args.digits_ckpt and not Path(args.digits_ckpt).is_file():
        parser.error(f"--digits-ckpt {args.digits_ckpt} does not exist")
    doc = run_compiled(args) if args.only == "compiled" else run(args)
    path = write(doc, Path(args.out))
    print(json.dumps(doc, indent=2))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
