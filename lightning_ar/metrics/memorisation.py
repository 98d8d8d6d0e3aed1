"""Memorisation figures: how close generated images are to their nearest training image, against unseen real ones.

A generator that copies its training images puts its samples nearer to the training set than new real images are.
For each image the Euclidean distance to its nearest training image (flattened pixels) is compared with the same
distance for a held-out real split:

- ``nn_ratio = median(d_generated) / median(d_heldout)``: about 1 for samples as novel as unseen real images, well
  below 1 for near-copies;
- ``copy_fraction``: the fraction of samples closer to a training image than 95% of held-out images are (about
  0.05 for a generator that does not copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

COPY_QUANTILE = 0.05


def nearest_distances(images: Tensor, reference: Tensor) -> Tensor:
    """Distance ``[N]`` from each image ``[N, ...]`` to its nearest image in ``reference`` ``[M, ...]`` (flattened)."""
    return torch.cdist(images.flatten(1).double(), reference.flatten(1).double()).amin(1)


def memorisation(generated: Tensor, train: Tensor, heldout: Tensor) -> dict[str, float]:
    """``nn_ratio`` and ``copy_fraction`` of ``generated`` images against ``train``, with ``heldout`` as the yardstick.

    Args:
        generated: ``[N, 1, 8, 8]`` generated images (clamped to ``[-1, 1]`` here, as the evaluators do).
        train: ``[M, 1, 8, 8]`` training images.
        heldout: ``[T, 1, 8, 8]`` unseen real images.

    Returns:
        ``nn_ratio``, ``copy_fraction``, ``median_nn_generated`` and ``median_nn_test`` (of ``heldout``).
    """
    d_gen = nearest_distances(generated.clamp(-1, 1), train)
    d_test = nearest_distances(heldout, train)
    threshold = torch.quantile(d_test, COPY_QUANTILE)
    return {"nn_ratio": float(d_gen.median() / d_test.median()),
            "copy_fraction": float((d_gen < threshold).double().mean()),
            "median_nn_generated": float(d_gen.median()), "median_nn_test": float(d_test.median())}
