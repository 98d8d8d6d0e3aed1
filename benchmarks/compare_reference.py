"""Side by side with the reference MAR (LTH14/mar) at identical settings, in one process, alternating rounds.

    python benchmarks/compare_reference.py /path/to/LTH14/mar [--rounds 3] [--out benchmarks/results/x.json]
    make bench-reference REF=/path/to/LTH14/mar

The reference is imported from the user's own checkout at run time (none of its code is in this repository); its
hard-coded ``.cuda()`` calls are made no-ops on CPU for the duration of its calls. Both models get the same
architecture (checked: parameter counts printed side by side), the same batch and fp32; each round times training
steps (forward, backward, AdamW step) and one guided DDPM-100 generation of each model, alternating which goes first.
Ratios are reference time / our time (> 1: we are faster), medians over the rounds. ``--compiled`` adds our
``compile: true`` training and our ``compile_sampler`` sampling beside them (``compiled_train_ratio``,
``compiled_sample_ratio``). Never run in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lightning_ar import MARGenerator
from lightning_ar.nn.masking import sample_mask_ratio

# name -> (latent C, H, W, patch, width, depth, heads, head width, head depth, batch, AR steps for sampling, samples)
CONFIGS: dict[str, dict[str, int]] = {
    "digits": dict(c=1, h=8, patch=2, width=128, depth=2, heads=4, head_width=256, head_depth=3, batch=128,
                   num_iter=8, samples=64),
    "imagenet_small": dict(c=16, h=16, patch=1, width=256, depth=4, heads=4, head_width=512, head_depth=3, batch=16,
                           num_iter=8, samples=8),
}
NUM_CLASSES, BUFFER, CFG, SAMPLING_STEPS = 10, 4, 3.0, 100


@contextmanager
def cuda_is_cpu() -> Iterator[None]:
    """Make ``Tensor.cuda()`` return the tensor itself (the reference calls it unconditionally)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def reference_model(ref_dir: Path, cfg: dict[str, int]) -> torch.nn.Module:
    """The reference ``MAR`` with the settings of ``cfg`` (imported from ``ref_dir``)."""
    if not (ref_dir / "models" / "mar.py").is_file():
        raise SystemExit(f"REF_DIR: {ref_dir} is not a checkout of LTH14/mar (no models/mar.py)")
    sys.path.insert(0, str(ref_dir))
    from models.mar import MAR

    return MAR(img_size=cfg["h"], vae_stride=1, patch_size=cfg["patch"], encoder_embed_dim=cfg["width"],
               encoder_depth=cfg["depth"], encoder_num_heads=cfg["heads"], decoder_embed_dim=cfg["width"],
               decoder_depth=cfg["depth"], decoder_num_heads=cfg["heads"], vae_embed_dim=cfg["c"],
               class_num=NUM_CLASSES, buffer_size=BUFFER, diffloss_d=cfg["head_depth"], diffloss_w=cfg["head_width"],
               num_sampling_steps=str(SAMPLING_STEPS), diffusion_batch_mul=4)


def our_model(cfg: dict[str, int], **options: Any) -> MARGenerator:
    """Our ``MARGenerator`` with the same architecture (``options``: e.g. ``compile=True``)."""
    return MARGenerator((cfg["c"], cfg["h"], cfg["h"]), NUM_CLASSES, 1.0, patch_size=cfg["patch"], width=cfg["width"],
                        encoder_depth=cfg["depth"], decoder_depth=cfg["depth"], num_heads=cfg["heads"],
                        buffer_size=BUFFER, head_width=cfg["head_width"], head_depth=cfg["head_depth"],
                        num_sampling_steps=SAMPLING_STEPS, timestep_spacing="linspace", **options)


def seeds_of_every_count(model: MARGenerator, device: str = "cpu") -> list[int]:
    """One seed per masked count ``model``'s training draws: its step with that seed uses that count."""
    counts: dict[int, int] = {}
    for seed in range(2000):
        ratio = sample_mask_ratio(torch.Generator(device).manual_seed(seed), device, low=model.hparams.mask_ratio_min,
                                  std=model.hparams.mask_ratio_std)
        counts.setdefault(model.training_masked_count(ratio), seed)
    return list(counts.values())


def compile_every_count(model: MARGenerator, latents: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds to compile ``model``'s training step for every masked count it can draw (one step per count)."""
    start = time.perf_counter()
    for seed in seeds_of_every_count(model):
        model.diffusion_loss(latents, labels, torch.Generator().manual_seed(seed)).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _seconds(fn: Callable[[], Any], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: Callable[[], torch.Tensor]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss().backward()
    optimizer.step()


def compare(ref_dir: Path, name: str, cfg: dict[str, int], rounds: int, steps: int,
            precision: str = "fp32", compiled: bool = False, compiled_sampler: bool = False) -> dict[str, Any]:
    """Median seconds per training step and per generation of both models over ``rounds`` alternating rounds;
    ``bf16-mixed`` runs all under CPU autocast to bfloat16 (weights and optimizer stay float32). Our training step
    ``j`` draws its mask ratio, orders and noise from seed ``j`` (the ratio varies from step to step as the
    reference's does). ``compiled``: also our ``compile: true`` model (compiled for every masked count first; same
    seeds) and our sampling with ``compile_sampler`` (compiled in a first call; ``compiled_sample_max_abs_diff``:
    its latents against the eager sampler's after the rounds, same seed; ``compiled_sample_max_rel_diff``: that over
    the eager latents' largest magnitude); ``compiled_sampler``: that sampling only."""
    def autocast() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    torch.manual_seed(0)
    ref, ours = reference_model(ref_dir, cfg).train(), our_model(cfg).train()
    latents = torch.randn(cfg["batch"], cfg["c"], cfg["h"], cfg["h"])
    labels = torch.arange(cfg["batch"]) % NUM_CLASSES
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    sample_labels = torch.arange(cfg["samples"]) % NUM_CLASSES

    def ref_train() -> None:
        with cuda_is_cpu(), autocast():
            train_step(ref, opt_ref, lambda: ref(latents, labels))

    def trainer(model: MARGenerator) -> Callable[[], None]:
        optimizer, seeds = torch.optim.AdamW(model.parameters(), lr=1e-4), iter(range(10**9))

        def step() -> None:
            with autocast():
                gen = torch.Generator().manual_seed(next(seeds))
                train_step(model, optimizer, lambda: model.diffusion_loss(latents, labels, gen))
        return step

    def ref_sample() -> None:
        with cuda_is_cpu(), torch.no_grad(), autocast():
            ref.eval().sample_tokens(cfg["samples"], num_iter=cfg["num_iter"], cfg=CFG, labels=sample_labels)
        ref.train()

    def our_sample(compile_sampler: bool = False) -> torch.Tensor:
        with autocast():
            return ours.generate(sample_labels, num_iter=cfg["num_iter"], cfg=CFG, progress=False,
                                 generator=torch.Generator().manual_seed(0), compile_sampler=compile_sampler)

    players = [("ref", ref_train, ref_sample), ("our", trainer(ours), our_sample)]
    extra: dict[str, Any] = {}
    if compiled or compiled_sampler:
        torch._dynamo.reset()  # torch's recompile limit counts the graphs of every model of a function together
        fast_train = None
        if compiled:
            fast = our_model(cfg, compile=True).train()
            fast.load_state_dict(ours.state_dict())
            with autocast():
                extra["compile_seconds"] = compile_every_count(fast, latents, labels)
            fast_train = trainer(fast)
        start = time.perf_counter()
        our_sample(True)  # compiles the head's step
        extra["compile_sampler_seconds"] = time.perf_counter() - start
        players.append(("compiled", fast_train, lambda: our_sample(True)))
    times: dict[str, list[float]] = {f"{who}_{what}": [] for who, train, sample in players
                                     for what, fn in (("train", train), ("sample", sample)) if fn is not None}
    for _, train, _ in players:
        if train is not None:
            train()  # warm-up
    for r in range(rounds):
        for who, train, sample in players if r % 2 == 0 else players[::-1]:
            if train is not None:
                times[f"{who}_train"].append(_seconds(train, steps))
            if sample is not None:
                times[f"{who}_sample"].append(_seconds(sample, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    if compiled:
        extra["compiled_train_ratio"] = med["ref_train"] / med["compiled_train"]
    if compiled or compiled_sampler:  # after the rounds' training steps: the head's weights are no longer zero
        extra["compiled_sample_ratio"] = med["ref_sample"] / med["compiled_sample"]
        compiled_latents, eager_latents = our_sample(True), our_sample()
        extra["compiled_sample_max_abs_diff"] = float((compiled_latents - eager_latents).abs().max())
        # the briefly trained head samples latents of std ~1e4: the difference relative to their largest value
        extra["compiled_sample_max_rel_diff"] = extra["compiled_sample_max_abs_diff"] / float(
            eager_latents.abs().max())
    return {
        "config": name, **cfg, "cfg": CFG, "sampling_steps": SAMPLING_STEPS, "threads": torch.get_num_threads(),
        "params_reference": sum(p.numel() for p in ref.parameters()),
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "seconds": med, "rounds": times,
        "train_ratio": med["ref_train"] / med["our_train"], "sample_ratio": med["ref_sample"] / med["our_sample"],
        **extra,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison for every config; print and (with ``--out``) write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_dir", type=Path, help="a checkout of github.com/LTH14/mar")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians over them)")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed per round")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--precision", choices=("fp32", "bf16-mixed"), default="fp32",
                        help="bf16-mixed: CPU autocast to bfloat16 for both models")
    parser.add_argument("--compiled", action="store_true",
                        help="also time our compile: true training and compile_sampler sampling (minutes of "
                             "compilation per config)")
    parser.add_argument("--compiled-sampler", action="store_true",
                        help="also time our compile_sampler sampling (without the compiled training)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    opts = parser.parse_args(argv)
    if opts.rounds < 1 or opts.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    results = {"results": [compare(opts.ref_dir.resolve(), n, CONFIGS[n], opts.rounds, opts.steps, opts.precision,
                                   opts.compiled, opts.compiled_sampler)
                           for n in opts.configs],
               "torch": torch.__version__, "precision": opts.precision, "device": "cpu"}
    text = json.dumps(results, indent=2)
    print(text)
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
