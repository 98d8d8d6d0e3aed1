"""Injected condition errors (positive controls of the ground-truth instruments), as sampler refinement hooks.

Each control follows :class:`~lightning_ar.nn.sampler.ConditionRefiner` and changes the conditions of the AR steps
``>= start_step`` only, so a run with a control and a clean run with the same generator seed are identical up to
that step. The statistics they need (per AR step and (class, position) group: the mean condition, and the pooled
within-group spread) are estimated once from a clean calibration run (:meth:`ConditionStats.from_traces`), so a
control does not depend on the batch it is applied to (except the shuffle, which by definition swaps within it).

- :class:`MeanBias`: ``c + scale * spread_k * u``, ``u`` a fixed random unit direction (default 0.5x the spread).
- :class:`Dispersion`: ``mu_g + factor * (c - mu_g)``: over- (``factor > 1``) or under-dispersion (``< 1``).
- :class:`ContextShuffle`: conditions swapped between samples of the same (class, position) at the same step (a
  derangement within each group): the marginal of the conditions is unchanged, the conditional is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.seeding import seeded_generator


@dataclass
class ConditionStats:
    """Per-step condition statistics of clean sampling.

    Attributes:
        means: ``[K, C, L, W]`` mean condition per AR step, class and position (class mean of the step where a
            group was seen fewer than twice).
        spread: ``[K]`` pooled within-group spread: ``sqrt(sum ||c - mu_g||^2 / sum (count_g - 1))``.
        counts: ``[K, C, L]`` conditions seen per group.
    """

    means: Tensor
    spread: Tensor
    counts: Tensor

    @classmethod
    def from_traces(cls, traces: Sequence[GenerationTrace], num_classes: int, seq_len: int) -> ConditionStats:
        """Estimate from the (unrefined) conditions of clean traces with the same number of AR steps."""
        num_steps = len(traces[0].steps)
        width = traces[0].steps[0].conditions.shape[-1]
        means = torch.zeros(num_steps, num_classes, seq_len, width, dtype=torch.float64)
        counts = torch.zeros(num_steps, num_classes, seq_len, dtype=torch.float64)
        spread = torch.zeros(num_steps, dtype=torch.float64)
        for k in range(num_steps):
            z, labels, positions = (torch.cat(x) for x in zip(*(t.conditions_at(k) for t in traces)))
            means[k], counts[k], spread[k] = _group_stats(z.double().cpu(), labels.cpu(), positions.cpu(),
                                                          num_classes, seq_len)
        return cls(means.float(), spread.float(), counts)

    def group_means(self, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        """``[N, W]`` the mean condition of each ``(label, position)`` at ``step``."""
        return self.means[step].to(labels.device)[labels, positions]


def _group_stats(z: Tensor, labels: Tensor, positions: Tensor, num_classes: int, seq_len: int
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Group means ``[C, L, W]``, counts ``[C, L]`` and the pooled within-group spread of conditions ``[N, W]``."""
    key = labels * seq_len + positions  # (N,)
    groups = num_classes * seq_len
    counts = torch.zeros(groups, dtype=z.dtype).index_add_(0, key, torch.ones_like(key, dtype=z.dtype))
    sums = torch.zeros(groups, z.shape[1], dtype=z.dtype).index_add_(0, key, z)
    means = sums / counts.clamp_min(1)[:, None]
    resid = (z - means[key]).square().sum(1)  # (N,)
    dof = (counts - 1).clamp_min(0).sum()
    spread = (resid.sum() / dof.clamp_min(1)).sqrt()
    class_means = torch.stack([z[labels == c].mean(0) if (labels == c).any() else z.mean(0)
                               for c in range(num_classes)])  # (C, W)
    means = torch.where((counts >= 2)[:, None], means, class_means.repeat_interleave(seq_len, dim=0))
    return means.view(num_classes, seq_len, -1), counts.view(num_classes, seq_len), spread


class _Control:
    """Common part: the steps where the control acts."""

    refine_null = False

    def __init__(self, start_step: int) -> None:
        if start_step < 0:
            raise ValueError(f"control start_step must be >= 0, got {start_step}")
        self.start_step = start_step

    def __call__(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        """``z`` ``[N, W]`` conditions of one step -> the injected ``[N, W]`` (unchanged before ``start_step``)."""
        return z if step < self.start_step else self.inject(z, labels, positions, step)

    def inject(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        raise NotImplementedError


class MeanBias(_Control):
    """Shift every condition by ``scale`` times the step's within-group spread along one fixed random direction.

    Args:
        stats: Clean-run statistics (:class:`ConditionStats`).
        start_step: First AR step that is changed.
        scale: Length of the shift in units of the spread (issue 14: 0.5).
        seed: Seed of the direction.
    """

    def __init__(self, stats: ConditionStats, start_step: int, scale: float = 0.5, seed: int = 0) -> None:
        super().__init__(start_step)
        self.stats, self.scale = stats, scale
        u = torch.randn(stats.means.shape[-1], generator=seeded_generator(seed))
        self.direction = u / u.norm()

    def inject(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        shift = self.scale * self.stats.spread[step].to(z.device) * self.direction.to(z.device, z.dtype)
        return z + shift  # (N, W)


class Dispersion(_Control):
    """Scale each condition's deviation from its (class, position, step) group mean by ``factor``.

    Args:
        stats: Clean-run statistics (:class:`ConditionStats`).
        start_step: First AR step that is changed.
        factor: 1.5 over-disperses, 0.5 under-disperses (issue 14).
    """

    def __init__(self, stats: ConditionStats, start_step: int, factor: float) -> None:
        super().__init__(start_step)
        if not factor >= 0:
            raise ValueError(f"dispersion factor must be >= 0, got {factor}")
        self.stats, self.factor = stats, factor

    def inject(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        mu = self.stats.group_means(labels, positions, step).to(z.dtype)  # (N, W)
        return mu + self.factor * (z - mu)


class ContextShuffle(_Control):
    """Swap conditions between samples of the same (class, position) at the same step: a random cyclic shift within
    each group of the batch (no condition keeps its own sample; a sample alone in its group is left as it is).

    Args:
        start_step: First AR step that is changed.
        seq_len: Tokens per sequence (forms the group key).
        seed: Seed of the permutations (one ``torch.Generator`` on the CPU, advanced by every call).
    """

    def __init__(self, start_step: int, seq_len: int, seed: int = 0) -> None:
        super().__init__(start_step)
        self.seq_len = seq_len
        self.generator = seeded_generator(seed)
        self.swapped = 0
        self.total = 0

    def inject(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        key = (labels * self.seq_len + positions).cpu()  # (N,)
        jitter = torch.rand(key.shape[0], generator=self.generator)
        order = torch.argsort(key.double() + 0.5 * jitter)  # groups contiguous, random order inside
        sorted_key = key[order]
        first = torch.ones_like(sorted_key, dtype=torch.bool)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        start = torch.cummax(torch.where(first, torch.arange(len(key)), 0), 0).values  # group start per slot
        size = torch.bincount(sorted_key)[sorted_key]  # group size per slot
        j = torch.arange(len(key))
        source = order[start + (j - start + 1) % size]  # next member of the same group, cyclically
        perm = torch.empty_like(order)
        perm[order] = source
        self.swapped += int((size > 1).sum())
        self.total += len(key)
        return z[perm.to(z.device)]
