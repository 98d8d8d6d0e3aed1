"""Do the paper table's digits generators copy their training images? Nearest-neighbour distances in pixel space.

A generator that reproduces its training images more closely than new digits do is memorising. This measures it
directly (``lightning_ar.metrics.memorisation``): for each generated image the Euclidean distance (64 pixels in
``[-1, 1]``) to its nearest training image, compared with the same distance for the real test images.
``benchmarks/paper_table.py`` computes the same figures on exactly the samples its test runs scored (all five rows,
with paired CIs); this script re-samples the three generators from their checkpoints.

    python benchmarks/memorisation.py --table outputs/paper_table     # every seed's CDM, MAR and AR generators

Per generator it reports ``nn_ratio = median(d_generated) / median(d_test)`` (about 1: as far from the training set
as unseen real digits; well below 1: near-copies) and ``copy_fraction``, the fraction of generated images closer to a
training image than 95% of test images are (about 0.05 for a generator that does not copy). Samples: one per test
label (180), seeded like the table's test runs. Writes ``<table>/memorisation.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_ar import CausalARGenerator, ConditionalDiffusion, MARGenerator
from lightning_ar.data.sources import DigitsSource
from lightning_ar.io import atomic_write_text
from lightning_ar.metrics.memorisation import memorisation, nearest_distances  # noqa: F401  (re-exported)

GENERATORS = {"CDM": ConditionalDiffusion, "MAR": MARGenerator, "AR": CausalARGenerator}


@torch.no_grad()
def sample(module: torch.nn.Module, labels: Tensor, seed: int, batch_size: int = 64) -> Tensor:
    """One image per label ``[N, 1, 8, 8]``, batches seeded as ``GenerationMetrics`` seeds its test batches."""
    module.eval()
    out = []
    for index, start in enumerate(range(0, len(labels), batch_size)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        out.append(module.generate(labels[start : start + batch_size], generator=generator))
    return torch.cat(out)


def run(table: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Memorisation figures of every ``seed*/{cdm,mar,ar}/fit/checkpoints/last.ckpt`` under ``table``."""
    source = DigitsSource()
    train, _ = source.split("train")
    test, test_labels = source.split("test")
    results: dict[str, dict[str, dict[str, float]]] = {}
    seeds = sorted(table.glob("seed*"), key=lambda p: int(p.name[4:]))
    if not seeds:
        raise FileNotFoundError(f"--table: no seed*/ folders under {table} (run benchmarks/paper_table.py first)")
    for seed_dir in seeds:
        seed = int(seed_dir.name[4:])
        for row, cls in GENERATORS.items():
            ckpt = seed_dir / row.lower() / "fit" / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                raise FileNotFoundError(f"{ckpt} is missing (an unfinished paper table run?)")
            module = cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
            generated = sample(module, test_labels, seed)
            results.setdefault(row, {})[str(seed)] = memorisation(generated, train, test)
            print(f"seed {seed} {row}: {results[row][str(seed)]}", flush=True)
    return results


def format_markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| generator | nn_ratio (mean ± std over seeds) | copy_fraction |", "|---|---|---|"]
    for row, per_seed in results.items():
        cells = []
        for key in ("nn_ratio", "copy_fraction"):
            v = np.array([s[key] for s in per_seed.values()])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="outputs/paper_table", help="output folder of benchmarks/paper_table.py")
    opts = parser.parse_args(argv)
    table = Path(opts.table)
    results = run(table)
    atomic_write_text(table / "memorisation.json", json.dumps(results, indent=2) + "\n")
    print(format_markdown(results))
    print(f"written {table / 'memorisation.json'}")
    return results


if __name__ == "__main__":
    main()
