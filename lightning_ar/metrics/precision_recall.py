"""Improved precision and recall (Kynkaanniemi et al., 2019) of generated features against real features.

Each set's manifold is approximated by the union of balls around its points, the radius of a ball being the distance
to the point's ``k``-th nearest neighbour within its own set (``k = 3`` in the paper and in ADM's evaluator).
Precision is the fraction of generated points inside some real ball; recall the fraction of real points inside some
generated ball. Distances are computed in blocks of ``chunk_size x chunk_size`` (``torch.cdist``), so 50k x 50k
sets need ``O(chunk_size**2)`` extra memory, never the full distance matrix.

Points exactly on a ball's boundary count as inside (``<=``, as in the reference implementation); ``torch.cdist``
round-off decides such ties.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def _check_features(features: Tensor, name: str, min_rows: int = 1) -> None:
    if not isinstance(features, Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a 2-d tensor [N, F] of features, got {shape}")
    if features.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {features.shape[0]}")


def knn_radii(features: Tensor, k: int = 3, chunk_size: int = 4096) -> Tensor:
    """Distance of every point to its ``k``-th nearest neighbour in the same set (the point itself excluded).

    Args:
        features: ``[N, F]`` points, ``N > k``.
        k: Neighbourhood size.
        chunk_size: Rows and columns per distance block.

    Returns:
        ``[N]`` radii (float32, on ``features.device``).
    """
    _check_features(features, "features", min_rows=k + 1)
    features = features.float()
    radii = []
    for rows in features.split(chunk_size):
        best = rows.new_full((rows.shape[0], 0), float("inf"))  # (R, <=k+1) smallest distances so far
        for cols in features.split(chunk_size):
            dist = torch.cdist(rows, cols)  # (R, C)
            best = torch.cat([best, dist], dim=1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])  # index 0 is the point itself (distance 0)
    return torch.cat(radii)


def inside_any_ball(probes: Tensor, centers: Tensor, radii: Tensor, chunk_size: int = 4096) -> Tensor:
    """Whether each probe lies in at least one ball ``|probe - centers[j]| <= radii[j]``.

    Args:
        probes: ``[M, F]`` points to test.
        centers: ``[N, F]`` ball centres.
        radii: ``[N]`` ball radii.
        chunk_size: Rows and columns per distance block.

    Returns:
        ``[M]`` bool.
    """
    _check_features(probes, "probes")
    _check_features(centers, "centers")
    if radii.shape != centers.shape[:1]:
        raise ValueError(f"radii must have shape [{centers.shape[0]}], got {tuple(radii.shape)}")
    probes, centers = probes.float(), centers.float()
    inside = []
    for rows in probes.split(chunk_size):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for cols, col_radii in zip(centers.split(chunk_size), radii.split(chunk_size)):
            hit |= (torch.cdist(rows, cols) <= col_radii).any(dim=1)  # (R, C) -> (R,)
        inside.append(hit)
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 4096) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` ``[M, F]`` against ``real`` ``[N, F]`` (each more than ``k`` rows).

    Returns:
        ``(precision, recall)`` in ``[0, 1]``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_features(real, "real features", min_rows=k + 1)
    _check_features(fake, "generated features", min_rows=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and generated features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    precision = inside_any_ball(fake, real, knn_radii(real, k, chunk_size), chunk_size).float().mean()
    recall = inside_any_ball(real, fake, knn_radii(fake, k, chunk_size), chunk_size).float().mean()
    return float(precision), float(recall)


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    """Whether a ``cat`` state (a list before synchronisation, a tensor after) holds no rows."""
    return len(state) == 0


class ImprovedPrecisionRecall(Metric):
    """Improved precision/recall as a torchmetrics ``Metric``: features of both sets are gathered across processes.

    ``update(features, real)`` adds features ``[B, F]`` of real or generated images (each process adds its own share;
    ``compute`` concatenates the shares of all processes). ``compute()`` returns ``{"precision", "recall"}``.

    Args:
        k: Neighbourhood size of the k-NN balls (paper and ADM: 3).
        chunk_size: Rows and columns per distance block.
        reset_real_features: Whether ``reset()`` also forgets the real features (like torchmetrics' FID).
        **kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, ...).
    """

    full_state_update = False

    def __init__(self, k: int = 3, chunk_size: int = 4096, reset_real_features: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"ImprovedPrecisionRecall.k must be >= 1, got {k}")
        if chunk_size < 1:
            raise ValueError(f"ImprovedPrecisionRecall.chunk_size must be >= 1, got {chunk_size}")
        self.k, self.chunk_size, self.reset_real_features = k, chunk_size, reset_real_features
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        """Add features ``[B, F]`` of real (``real=True``) or generated images."""
        _check_features(features, "features")
        (self.real_features if real else self.fake_features).append(features.float())

    def compute(self) -> dict[str, Tensor]:
        """``precision`` and ``recall`` (0-d tensors) of all generated against all real features."""
        if _is_empty(self.real_features) or _is_empty(self.fake_features):
            raise RuntimeError("ImprovedPrecisionRecall needs real and generated features before compute()")
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        precision, recall = precision_recall(real, fake, self.k, self.chunk_size)
        return {"precision": torch.tensor(precision), "recall": torch.tensor(recall)}

    def reset(self) -> None:
        """Forget the generated features (and the real ones when ``reset_real_features``)."""
        if self.reset_real_features:
            super().reset()
            return
        real = deepcopy(self.real_features)
        super().reset()
        self.real_features = real
