"""Condition statistics that see collapse: pooled within-group dispersion, its ratio to real-context conditions, and
the null test of a refinement.

A divergence to ideal conditions rewards shrinking every condition toward its group mean (a low divergence at a
blur near the within-group spread is mostly each point's distance to its group's centre). The dispersion ratio
exposes that: per AR step, the pooled within-(class, position) dispersion ``E||c - mu_group||^2`` of the produced
conditions over that of held-out real-context (teacher-forced) conditions. A ratio near 1 means the produced
conditions vary as much within a group as error-free ones; below :data:`RATIO_BAND`'s lower end they are collapsed,
above its upper end over-dispersed. The criterion is fixed here before any measurement.

Plain torch/NumPy; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_ar.theory.records import Record

RATIO_BAND = (0.9, 1.1)  # a divergence reduction counts as an improvement only with the ratio inside this band
NULL_TOLERANCE = 0.1  # a refinement must move conditions drawn from its target by less than this x their spread
TRIVIAL_DISPERSION = 1e-10  # relative to the mean squared norm: no within-group variation (e.g. AR step 0)


@dataclass
class Dispersion:
    """Pooled within-group dispersion of one cloud of conditions.

    Attributes:
        value: ``mean_i e_i`` with ``e_i = n_g / (n_g - 1) * ||c_i - mu_g||^2`` over the points of groups with at
            least two points (unbiased for a common within-group variance; summed over the ``D`` dimensions).
        se: Standard error of ``value``, cluster-robust (points of one cluster, e.g. one image, are not independent).
        num_points: Points used.
        num_groups: Groups used.
    """

    value: float
    se: float
    num_points: int
    num_groups: int


def _cluster_se(e: np.ndarray, clusters: np.ndarray) -> float:
    """Cluster-robust standard error of ``mean(e)``: ``sqrt(C/(C-1) * sum_c r_c^2) / N``, ``r_c`` the summed
    residuals of cluster ``c``."""
    n = e.size
    if n < 2:
        return math.nan
    _, idx = np.unique(clusters, return_inverse=True)
    sums = np.bincount(idx, weights=e - e.mean())
    c = sums.size
    return float(math.sqrt(c / (c - 1) * float((sums**2).sum())) / n) if c > 1 else math.nan


def _contributions(z: Tensor, groups: Tensor, keep: Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """``e_i`` ``[n]`` of the kept points of groups with >= 2 kept points, their indices into ``z``, and the group
    count."""
    z, groups = z.detach().double(), groups.detach().long()
    uniq, inverse = torch.unique(groups, return_inverse=True)
    counts = torch.bincount(inverse[keep], minlength=len(uniq)).double()  # (G,)
    sums = torch.zeros(len(uniq), z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, inverse[keep], z[keep])
    means = sums / counts.clamp_min(1)[:, None]  # (G, D)
    used = keep & (counts[inverse] >= 2)  # (N,)
    n_g = counts[inverse[used]]
    e = n_g / (n_g - 1) * ((z[used] - means[inverse[used]]) ** 2).sum(1)
    return e.cpu().numpy(), used.nonzero().squeeze(1).cpu().numpy(), int((counts >= 2).sum())


def pooled_dispersion(z: Tensor, groups: Tensor, clusters: Tensor | None = None,
                      keep_groups: Tensor | None = None) -> Dispersion:
    """Pooled within-group dispersion of conditions ``z`` ``[N, D]`` grouped by ``groups`` ``[N]``.

    Args:
        z: ``[N, D]`` conditions.
        groups: ``[N]`` integer group ids (e.g. ``label * seq_len + position``).
        clusters: ``[N]`` ids of dependent units for the standard error (e.g. the generated image); ``None``: every
            point is its own cluster.
        keep_groups: Optional ``[G]`` group ids to restrict to (e.g. groups present in both clouds of a ratio).

    Returns:
        :class:`Dispersion` (NaN value when no group has two points).
    """
    keep = torch.ones_like(groups, dtype=torch.bool) if keep_groups is None else torch.isin(groups, keep_groups)
    e, used, num_groups = _contributions(z, groups, keep)
    if e.size == 0:
        return Dispersion(math.nan, math.nan, 0, 0)
    cl = np.arange(len(z)) if clusters is None else clusters.detach().cpu().numpy()
    return Dispersion(float(e.mean()), _cluster_se(e, cl[used]), int(e.size), num_groups)


@dataclass
class DispersionRatio(Record):
    """Produced over reference pooled within-group dispersion, with its delta-method standard error.

    Attributes:
        ratio: ``D_produced / D_reference`` on the groups with at least two points in both clouds.
        se: ``ratio * sqrt((se_p / D_p)^2 + (se_r / D_r)^2)`` (independent clouds).
        produced: :class:`Dispersion` of the produced conditions (as a dict).
        reference: :class:`Dispersion` of the reference conditions (as a dict).
        state: ``collapsed`` (ratio < 0.9), ``over-dispersed`` (> 1.1), ``consistent`` (within :data:`RATIO_BAND`)
            or ``not measurable`` (no within-group variation in the reference, e.g. AR step 0, or no common group).
    """

    ratio: float
    se: float
    produced: dict
    reference: dict
    state: str


def ratio_state(ratio: float) -> str:
    """``collapsed`` / ``consistent`` / ``over-dispersed`` by :data:`RATIO_BAND`, or ``not measurable`` (NaN)."""
    if not math.isfinite(ratio):
        return "not measurable"
    return "collapsed" if ratio < RATIO_BAND[0] else "over-dispersed" if ratio > RATIO_BAND[1] else "consistent"


def dispersion_ratio(z: Tensor, groups: Tensor, ref: Tensor, ref_groups: Tensor, clusters: Tensor | None = None,
                     ref_clusters: Tensor | None = None) -> DispersionRatio:
    """Dispersion ratio of produced conditions ``z`` ``[N, D]`` to reference (real-context) ones ``ref`` ``[M, D]``.

    Only groups with at least two points in both clouds enter either dispersion, so that a difference in which
    groups are present cannot masquerade as a change of spread.

    Args:
        z: ``[N, D]`` produced conditions.
        groups: ``[N]`` their group ids.
        ref: ``[M, D]`` reference conditions (held-out, teacher-forced).
        ref_groups: ``[M]`` their group ids.
        clusters: ``[N]`` dependent units of ``z`` (e.g. the image index) for the standard error.
        ref_clusters: ``[M]`` dependent units of ``ref`` (``None``: independent points).
    """
    ref_groups = ref_groups.to(groups.device)
    g_p, c_p = torch.unique(groups, return_counts=True)
    g_r, c_r = torch.unique(ref_groups, return_counts=True)
    common = g_p[(c_p >= 2) & torch.isin(g_p, g_r[c_r >= 2])]
    p = pooled_dispersion(z, groups, clusters, common)
    r = pooled_dispersion(ref.to(z.device), ref_groups, ref_clusters, common)
    scale = float(ref.detach().double().pow(2).sum(1).mean()) if len(ref) else 0.0
    if not (math.isfinite(r.value) and r.value > TRIVIAL_DISPERSION * max(scale, 1e-300)):
        return DispersionRatio(math.nan, math.nan, asdict(p), asdict(r), "not measurable")
    ratio = p.value / r.value
    se = ratio * math.sqrt((p.se / p.value) ** 2 + (r.se / r.value) ** 2) if p.value > 0 else math.nan
    return DispersionRatio(ratio, se, asdict(p), asdict(r), ratio_state(ratio))


@dataclass
class NullTest(Record):
    """How far a refinement moves conditions that are already drawn from its target distribution.

    Attributes:
        moved: RMS displacement ``sqrt(mean ||R(c) - c||^2)``.
        spread: Within-group spread of the input, ``sqrt`` of its pooled dispersion.
        ratio: ``moved / spread``.
        passes: ``ratio < NULL_TOLERANCE`` (0.1).
        dispersion_after: Pooled dispersion of the output over that of the input (1: spread kept).
        num_points: Conditions refined.
    """

    moved: float
    spread: float
    ratio: float
    passes: bool
    dispersion_after: float
    num_points: int


Refine = Callable[[Tensor, Tensor, Tensor, int], Tensor]  # (z [n, D], labels [n], positions [n], step) -> [n, D]


@torch.no_grad()
def null_test(refine: Refine, z: Tensor, labels: Tensor, positions: Tensor, step: int, seq_len: int,
              batch_size: int, generator: torch.Generator | None = None) -> NullTest:
    """Feed conditions drawn from the target distribution (e.g. held-out ideal ones) to ``refine`` as sampling would.

    The conditions ``z`` ``[N, D]`` are shuffled (``generator``) and refined in chunks of ``batch_size``, as the
    conditions of one sampling batch at AR step ``step`` would be; a refinement that only removes condition error
    should leave them where they are (SPEC 2.3: move by less than 0.1x their spread).

    Args:
        refine: The refinement, ``(z, labels, positions, step) -> z'`` (e.g. ``OTRefinement.refine_step``).
        z: ``[N, D]`` conditions of the target distribution.
        labels: ``[N]`` class labels.
        positions: ``[N]`` token positions.
        step: AR step.
        seq_len: Token positions (group ids are ``label * seq_len + position``).
        batch_size: Conditions per refinement call.
        generator: RNG of the shuffle (on ``z``'s device, or CPU).
    """
    if batch_size < 1:
        raise ValueError(f"null_test batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(z), generator=generator, device=generator.device if generator else "cpu").to(z.device)
    z, labels, positions = z[order], labels[order], positions[order]
    out = torch.cat([refine(z[i: i + batch_size], labels[i: i + batch_size], positions[i: i + batch_size], step)
                     for i in range(0, len(z), batch_size)])  # (N, D)
    groups = labels.long() * seq_len + positions.long()
    before, after = pooled_dispersion(z, groups), pooled_dispersion(out, groups)
    moved = float((out.double() - z.double()).pow(2).sum(1).mean().sqrt())
    spread = math.sqrt(before.value) if math.isfinite(before.value) else math.nan
    ratio = moved / spread if spread > 0 else math.nan
    return NullTest(moved, spread, ratio, bool(ratio < NULL_TOLERANCE), after.value / before.value
                    if before.value > 0 else math.nan, int(len(z)))
