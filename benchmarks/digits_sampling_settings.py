"""Score one digits checkpoint under several sampling settings (same test labels, same seed).

    python benchmarks/digits_sampling_settings.py outputs/demo/fit/checkpoints/last.ckpt

Prints one line per setting: digits-FID, conditional accuracy, latent statistics and wall time.
"""

from __future__ import annotations

import sys
import time

import torch

from lightning_ar import LatentDataModule, MARGenerator
from lightning_ar.metrics import DigitsEvaluator

SETTINGS = [
    {"cfg": 1.0},
    {"cfg": 3.0},
    {"cfg": 3.0, "temperature": 0.8},
    {"cfg": 3.0, "sampler": "ddim", "num_sampling_steps": 50},
    {"cfg": 3.0, "sampler": "dpm++", "num_sampling_steps": 20},
    {"cfg": 2.0, "num_iter": 16},
]


def main(ckpt: str) -> None:
    model = MARGenerator.load_from_checkpoint(ckpt, map_location="cpu")
    evaluator = DigitsEvaluator()
    evaluator.prepare(torch.device("cpu"))
    real, labels = LatentDataModule("digits").source.split("test")
    print(f"real: mean {real.mean():.3f} std {real.std():.3f}")
    for kwargs in SETTINGS:
        evaluator.reset()
        start = time.perf_counter()
        latents = model.generate(labels, generator=torch.Generator().manual_seed(0), **kwargs)
        seconds = time.perf_counter() - start
        evaluator.update(latents, labels)
        r = evaluator.compute()
        print(f"{kwargs}: fid {r['fid']:.1f} cond_acc {r['cond_acc']:.3f} | mean {latents.mean():.3f} "
              f"std {latents.std():.3f} | {seconds:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1])
