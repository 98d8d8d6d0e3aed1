"""``lightning-ar evaluate``: score an ADM samples ``.npz`` against a reference, by the published FID protocol.

See :mod:`lightning_ar.metrics.image_quality` for the metrics and :mod:`lightning_ar.metrics.fid_stats` for the
protocol (FID against the ``mu``/``sigma`` stored in ADM's reference batches, as ADM's evaluator and MAR's table).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_ar.io import atomic_write_text
from lightning_ar.metrics.image_io import iter_npz_images, npz_image_count
from lightning_ar.metrics.image_quality import ImageQualityEvaluator
from lightning_ar.progress import progress_bar


def evaluate_npz(
    samples_npz: str | Path,
    reference: str | Path | None = None,
    inception_weights: str | Path | None = None,
    feature_extractor: nn.Module | None = None,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    reference_stats: str | Path | None = None,
    progress: bool = True,
) -> dict[str, float | str]:
    """Score an ADM-format samples ``.npz`` (``arr_0`` uint8 ``[N, H, W, 3]``) against a reference.

    ``reference`` is an ADM reference batch (its ``mu``/``sigma`` give FID when present, its ``arr_0`` precision/
    recall and the floors) or an image folder; ``reference_stats`` an ``.npz`` with ``mu``/``sigma`` (e.g. a
    stats-only file) that FID uses instead. At least one of the two is needed.

    Returns:
        The metrics of :class:`ImageQualityEvaluator` and their floors, ``num_samples``, and ``fid_reference``
        (a string naming the statistics FID was computed against).
    """
    if not Path(samples_npz).is_file():
        raise FileNotFoundError(f"samples: no file at {samples_npz}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    evaluator = ImageQualityEvaluator(None, 1, reference, inception_weights, feature_extractor,
                                      batch_size=batch_size, distributed=False, reference_stats=reference_stats,
                                      progress=progress)
    evaluator.prepare(device)
    total = math.ceil(npz_image_count(samples_npz, "samples") / batch_size)
    count = 0
    batches = iter_npz_images(samples_npz, batch_size, "samples")  # (B, H, W, 3), streamed
    for batch in progress_bar(batches, total=total, desc="samples", unit="batch", disable=not progress):
        evaluator.update_images(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2))
        count += len(batch)
    return {**evaluator.compute(), **evaluator.reference(), "num_samples": float(count),
            "fid_reference": evaluator.fid_reference}


def evaluate_main(argv: list[str] | None = None) -> None:
    """``lightning-ar evaluate SAMPLES.npz [--reference REF] [--reference-stats STATS] [--output results.json]``."""
    parser = argparse.ArgumentParser(prog="lightning-ar evaluate", description=evaluate_npz.__doc__.splitlines()[0])
    parser.add_argument("samples", help="ADM samples .npz (arr_0 uint8 [N, H, W, 3])")
    parser.add_argument("--reference", default=None,
                        help="ADM reference batch .npz (arr_0 images; its mu/sigma, when present, give FID) or an "
                             "image folder")
    parser.add_argument("--reference-stats", default=None,
                        help=".npz with mu [F] and sigma [F, F] (an ADM reference batch or a stats-only file): FID "
                             "against these stored statistics, the published protocol")
    parser.add_argument("--inception-weights", default=None, help="local Inception weights (offline machines)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per network pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (on stderr)")
    args = parser.parse_args(argv)
    if args.reference is None and args.reference_stats is None:
        parser.error("give --reference (ADM reference batch or image folder) and/or --reference-stats")
    results = evaluate_npz(args.samples, args.reference, args.inception_weights, batch_size=args.batch_size,
                           device=args.device, reference_stats=args.reference_stats, progress=not args.no_progress)
    text = json.dumps(results, indent=2, sort_keys=True)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text)
