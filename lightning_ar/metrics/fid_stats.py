"""FID against stored reference statistics: the protocol of ADM's evaluator and of MAR's published table.

ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz`` and its siblings) hold ``mu`` ``[2048]`` and ``sigma``
``[2048, 2048]``: mean and covariance of the Inception pool_3 features of the whole ImageNet training set, plus 10,000
images (``arr_0``) for precision/recall. ADM's evaluator and MAR's ``torch_fidelity.calculate_metrics(...,
fid_statistics_file="fid_stats/adm_in256_stats.npz")`` compute FID-50K against those stored statistics; the real side
is never recomputed from ``arr_0``. :class:`ReferenceStatsFID` does the same: it accumulates the generated features'
mean and covariance (float64, summed across processes) and compares them with the stored ``mu``/``sigma``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

STATS_KEYS = ("mu", "sigma")


def npz_members(path: str | Path) -> set[str]:
    """Array names in an ``.npz`` (read from the zip directory; no array is loaded)."""
    with zipfile.ZipFile(path) as zf:
        return {name[: -len(".npy")] for name in zf.namelist() if name.endswith(".npy")}


def has_reference_stats(path: str | Path) -> bool:
    """Whether ``path`` is an ``.npz`` holding both ``mu`` and ``sigma``."""
    path = Path(path)
    return path.is_file() and zipfile.is_zipfile(path) and set(STATS_KEYS) <= npz_members(path)


def load_reference_stats(path: str | Path, name: str = "reference_stats") -> tuple[Tensor, Tensor]:
    """``mu`` ``[F]`` and ``sigma`` ``[F, F]`` (float64) of an ADM reference batch or a stats-only ``.npz``.

    Raises:
        FileNotFoundError: no file at ``path`` (named by ``name``).
        ValueError: not an ``.npz``, keys missing, wrong shapes or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{name} {path}: expected an .npz with mu [F] and sigma [F, F]")
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in STATS_KEYS if key not in data.files]
        if missing:
            raise ValueError(f"{name} {path}: no {' and '.join(missing)} (members: {sorted(data.files)})")
        mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name} {path}: expected mu [F] and sigma [F, F], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name} {path}: mu/sigma hold NaN or Inf")
    return torch.from_numpy(mu), torch.from_numpy(sigma)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` in float64.

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of ``sigma1 @ sigma2``
    (real and non-negative for two covariance matrices, up to round-off, whose imaginary parts are dropped).

    Args:
        mu1: ``[F]`` mean of the first set.
        sigma1: ``[F, F]`` covariance of the first set.
        mu2: ``[F]`` mean of the second set.
        sigma2: ``[F, F]`` covariance of the second set.

    Returns:
        0-d float64 tensor.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    sqrt_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * sqrt_trace


class ReferenceStatsFID(Metric):
    """FID of generated features against stored reference statistics (``mu``, ``sigma``).

    ``update(features)`` adds generated features ``[B, F]``; ``compute()`` returns the Frechet distance between their
    mean/covariance (sums reduced across processes) and the reference. ``reset()`` forgets the generated features.

    Args:
        mu: ``[F]`` reference mean.
        sigma: ``[F, F]`` reference covariance.
        **kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, ...).
    """

    full_state_update = False

    def __init__(self, mu: Tensor, sigma: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mu.ndim != 1 or tuple(sigma.shape) != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"expected mu [F] and sigma [F, F], got {tuple(mu.shape)} and {tuple(sigma.shape)}")
        dim = mu.shape[0]
        self.register_buffer("mu", mu.double(), persistent=False)
        self.register_buffer("sigma", sigma.double(), persistent=False)
        self.add_state("fake_features_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fake_features_cov_sum", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fake_features_num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        """Add generated features ``[B, F]``."""
        if features.ndim != 2 or features.shape[1] != self.mu.shape[0]:
            raise ValueError(
                f"reference statistics have {self.mu.shape[0]} features but the generated features are "
                f"{tuple(features.shape)}: the statistics must come from the same feature layer (num_features)"
            )
        features = features.double()
        self.fake_features_sum += features.sum(dim=0)
        self.fake_features_cov_sum += features.t() @ features
        self.fake_features_num_samples += features.shape[0]

    def compute(self) -> Tensor:
        """The Frechet distance (0-d float64); needs at least 2 generated samples."""
        n = self.fake_features_num_samples
        if n < 2:
            raise RuntimeError("ReferenceStatsFID needs at least 2 generated samples")
        mean = self.fake_features_sum / n
        cov = (self.fake_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
        return frechet_distance(self.mu, self.sigma, mean, cov)
