"""Paired, hierarchical bootstrap over training seeds and samples, and the verdict it supports.

A replicate draws the seeds with replacement and, inside each drawn seed, its samples with replacement
(multinomial weights). Every statistic of every arm in one comparison is computed with the *same* replicate weights,
so differences are paired: by seed (runs trained with the same seed) and by sample index (the same labels and
sampling seeds). A statistic is a function of per-seed weighted sums, so non-linear ones (the Gaussian KL of pooled
residuals) are recomputed on each replicate rather than averaged.

:func:`verdict`: "holds" when the 95% interval of the pre-registered difference lies on the predicted side of zero,
"does not hold" when it lies on the other side, "not resolved" when it covers zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_ar.seeding import seeded_generator
from lightning_ar.theory.stats import percentile_ci
from lightning_ar.theory.stats import verdict as stats_verdict


@dataclass
class Replicates:
    """Bootstrap replicates of ``S`` seeds with ``N`` samples each.

    Attributes:
        seeds: ``[R, S]`` index of the seed in each slot (the identity for the point estimate).
        weights: ``[R, S, N]`` multinomial sample weights per slot (summing to ``N``).
    """

    seeds: Tensor
    weights: Tensor

    @classmethod
    def draw(cls, num_seeds: int, num_samples: int, count: int = 1000, seed: int = 0) -> Replicates:
        """``count`` replicates (plus none: the point estimate is :meth:`identity`)."""
        gen = seeded_generator(seed)
        seeds = torch.randint(0, num_seeds, (count, num_seeds), generator=gen)
        draws = torch.randint(0, num_samples, (count * num_seeds, num_samples), generator=gen)
        weights = torch.zeros(count * num_seeds, num_samples, dtype=torch.float64)
        weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
        return cls(seeds, weights.view(count, num_seeds, num_samples))

    @classmethod
    def identity(cls, num_seeds: int, num_samples: int) -> Replicates:
        """One replicate: every seed once, every sample weight 1."""
        return cls(torch.arange(num_seeds)[None], torch.ones(1, num_seeds, num_samples, dtype=torch.float64))

    def sums(self, values: Tensor) -> Tensor:
        """Weighted per-slot sums of per-sample ``values`` ``[S, N, ...]`` -> ``[R, S, ...]``."""
        flat = values.reshape(values.shape[0], values.shape[1], -1).double()  # (S, N, F)
        out = torch.einsum("rsn,rsnf->rsf", self.weights, flat[self.seeds])
        return out.view(*self.seeds.shape, *values.shape[2:])

    def mean(self, values: Tensor) -> Tensor:
        """``[R]`` mean over slots of the weighted per-seed sample mean of ``values`` ``[S, N]``."""
        return (self.sums(values) / values.shape[1]).mean(dim=1)


def interval(values: Tensor | np.ndarray) -> tuple[float, float]:
    """95% percentile interval of bootstrap replicates ``[R]`` (:func:`~lightning_ar.theory.stats.percentile_ci`)."""
    return percentile_ci(np.asarray(values, dtype=float))


def estimate(stat: Callable[[Replicates], Tensor], num_seeds: int, num_samples: int, replicates: Replicates
             ) -> dict[str, float]:
    """``{"value", "lo", "hi"}``: the statistic on the data and its 95% bootstrap interval.

    ``stat`` maps a :class:`Replicates` to one value per replicate ``[R]``.
    """
    value = float(stat(Replicates.identity(num_seeds, num_samples))[0])
    lo, hi = interval(stat(replicates).cpu().numpy())
    return {"value": value, "lo": lo, "hi": hi}


def verdict(ci: dict[str, float], predicted: str) -> str:
    """:func:`~lightning_ar.theory.stats.verdict` of a difference predicted ``"> 0"`` or ``"< 0"`` from its interval
    ``{"lo", "hi"}``: ``holds`` / ``does not hold`` / ``not resolved`` (``not measurable`` for a NaN bound)."""
    if predicted not in ("> 0", "< 0"):
        raise ValueError(f"predicted must be '> 0' or '< 0', got {predicted!r}")
    return stats_verdict(ci["lo"], ci["hi"], "positive" if predicted == "> 0" else "negative")
