"""The head's training loss (forward and backward) as it runs now against the per-row formulation every row of
MAR's head computes (timestep MLP on every row, conditions embedded after the ``diffusion_batch_mul`` repeats), on
the masked-token counts of ``compare_reference``'s two configs; alternating rounds in one process, fp32.

    python benchmarks/head_training.py [--rounds 7] [--out benchmarks/results/head-training-cpu-DATE.json]

``speedup`` is per-row seconds / our seconds (medians over the rounds); ``max_rel_diff`` compares the two losses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_ar.nn import DiffusionLoss

# (token dim, condition dim, head width, masked tokens per batch): batch x ~0.85 of the sequence (the mean of MAR's
# truncated-normal mask ratio from 0.7), repeated 4 times
SHAPES = {"digits": (4, 128, 256, 128 * 14), "imagenet_small": (16, 256, 512, 16 * 218)}
REPEATS = 4


def per_row_loss(head: DiffusionLoss, target: Tensor, z: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """``[N]`` loss with the repeats made before the head (MAR's formulation)."""
    target, z = target.repeat(REPEATS, 1), z.repeat(REPEATS, 1)
    ab = head.alphas_cumprod[t][:, None]
    x_t = ab.sqrt() * target + (1.0 - ab).sqrt() * noise
    out = head.net(x_t, t, z).float()
    return ((out[:, : head.token_dim] - noise) ** 2).mean(dim=-1) + head._vb_bits(out, target, x_t, t)


def measure(name: str, rounds: int) -> dict[str, Any]:
    token_dim, cond_dim, width, tokens = SHAPES[name]
    torch.manual_seed(0)
    head = DiffusionLoss(token_dim, cond_dim, width, depth=3).train()
    with torch.no_grad():
        for p in head.parameters():  # zero-initialised modulations would make every block the identity
            p.normal_(0, 0.02)
    gen = torch.Generator().manual_seed(0)
    target, z = torch.randn(tokens, token_dim, generator=gen), torch.randn(tokens, cond_dim, generator=gen)
    z.requires_grad_(True)
    t, noise = head.draw_noise(tokens * REPEATS, target.device, target.dtype, gen)
    runs = {"ours": lambda: head.loss_given_noise(target, z, t, noise),
            "per_row": lambda: per_row_loss(head, target, z, t, noise)}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn().mean().backward()  # warm-up
    for r in range(rounds):
        for key, fn in list(runs.items())[:: 1 if r % 2 == 0 else -1]:
            head.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn().mean().backward()
            seconds[key].append(time.perf_counter() - start)
    with torch.no_grad():
        ours, ref = runs["ours"](), runs["per_row"]()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"config": name, "rows": tokens * REPEATS, "width": width, "seconds": med, "rounds": seconds,
            "speedup": med["per_row"] / med["ours"],
            "max_rel_diff": float(((ours - ref).abs() / ref.abs().clamp(min=1e-6)).max())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    doc = {"results": [measure(name, args.rounds) for name in SHAPES], "torch": torch.__version__,
           "threads": torch.get_num_threads(), "precision": "fp32", "device": "cpu"}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
