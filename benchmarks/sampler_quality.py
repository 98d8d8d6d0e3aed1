"""Sampler choice at equal quality: one digits checkpoint, the same test labels and seeds, several head samplers.

    python benchmarks/sampler_quality.py outputs/demo/fit/checkpoints/last.ckpt [--seeds 3] [--out outputs/bench]

The checkpoint may be any generator of the collection saved by ``lightning-ar fit`` (``MARGenerator``,
``CausalARGenerator``, ``ConditionalDiffusion``); its class is read from the checkpoint.

For every setting it reports digits-FID and conditional accuracy (per seed: mean and std; and pooled over all seeds),
seconds per image, the end-to-end speed-up over DDPM-100 and whether it is at equal quality: pooled digits-FID
within 10% of DDPM-100's and conditional accuracy within 1 point. Prints JSON and writes
``<out>/sampler_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

REFERENCE = "ddpm-100"
SETTINGS = {REFERENCE: ("ddpm", 100), "ddpm-25": ("ddpm", 25), "ddpm-15": ("ddpm", 15), "ddpm-10": ("ddpm", 10),
            "dpm++-20": ("dpm++", 20), "ddim-25": ("ddim", 25)}


def score(evaluator, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Metrics of generated ``(latents, labels)`` batches pooled together."""
    evaluator.reset()
    for latents, labels in batches:
        evaluator.update(latents, labels)
    return evaluator.compute()


def run_setting(model, evaluator, labels: torch.Tensor, sampler: str, steps: int, seeds: int) -> dict[str, Any]:
    batches, per_seed, seconds = [], [], 0.0
    for seed in range(seeds):
        start = time.perf_counter()
        latents = model.generate(labels, sampler=sampler, num_sampling_steps=steps,
                                 generator=torch.Generator().manual_seed(seed))
        seconds += time.perf_counter() - start
        batches.append((latents, labels))
        per_seed.append(score(evaluator, [(latents, labels)]))
    pooled = score(evaluator, batches)
    row: dict[str, Any] = {"sampler": sampler, "num_sampling_steps": steps,
                           "sec_per_image": round(seconds / (seeds * len(labels)), 5),
                           "fid_pooled": round(pooled["fid"], 3), "cond_acc_pooled": round(pooled["cond_acc"], 4)}
    for key in ("fid", "cond_acc"):
        values = [r[key] for r in per_seed]
        row[f"{key}_mean"] = round(statistics.mean(values), 4)
        row[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
    return row


def judge(rows: dict[str, dict[str, Any]]) -> None:
    """Add speed-up over DDPM-100 and the equal-quality verdict to every row."""
    ref = rows[REFERENCE]
    for row in rows.values():
        row["speedup_vs_ddpm100"] = round(ref["sec_per_image"] / row["sec_per_image"], 2)
        row["fid_rel_change"] = round(row["fid_pooled"] / ref["fid_pooled"] - 1, 3)
        row["cond_acc_change"] = round(row["cond_acc_pooled"] - ref["cond_acc_pooled"], 4)
        row["equal_quality"] = row["fid_rel_change"] <= 0.10 and row["cond_acc_change"] >= -0.01


def load_generator(checkpoint: str):
    """The generator saved in ``checkpoint`` (read with ``weights_only=True``): its class is the one the checkpoint
    records (LightningCLI's ``_class_path`` or this project's record), else ``MARGenerator``."""
    from lightning_ar import CausalARGenerator, ConditionalDiffusion, MARGenerator
    from lightning_ar.checkpoints.loading import build_from_checkpoint

    allowed = (MARGenerator, CausalARGenerator, ConditionalDiffusion)
    return build_from_checkpoint(checkpoint, "--checkpoint", allowed, lambda hparams: MARGenerator)


def evaluate(checkpoint: str, seeds: int = 3, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Score every setting of :data:`SETTINGS` on ``labels`` (default: the digits test split's), ``seeds`` seeds
    each."""
    from lightning_ar import LatentDataModule
    from lightning_ar.metrics import DigitsEvaluator

    model = load_generator(checkpoint).eval()
    evaluator = DigitsEvaluator()
    evaluator.prepare(torch.device("cpu"))
    if labels is None:
        _, labels = LatentDataModule("digits").source.split("test")
    rows = {name: run_setting(model, evaluator, labels, *setting, seeds) for name, setting in SETTINGS.items()}
    judge(rows)
    return {"checkpoint": checkpoint, "model": type(model).__name__, "seeds": seeds, "images_per_seed": len(labels),
            "cfg": model.hparams.cfg, "num_iter": model.hparams.get("num_iter"), "settings": rows}


def main(argv: list[str] | None = None) -> None:
    from lightning_ar.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a trained digits generator checkpoint (e.g. from `make demo`)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    text = json.dumps(evaluate(args.checkpoint, args.seeds), indent=2)
    atomic_write_text(Path(args.out) / "sampler_quality.json", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
