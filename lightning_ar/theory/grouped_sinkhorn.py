"""Class- and position-aware Sinkhorn divergence solved group by group, batched over bootstrap weightings.

The labelled divergence of the refinement (``lightning_ar.nn.refiners.labelled_divergence``: target mass matched per
(class, position) group to the source's, one-hots appended at a weight that forbids crossing groups) decomposes
exactly into independent problems, one per group: with no mass crossing groups and equal group masses ``m_g``,

    S_eps(alpha, beta) = sum_g m_g S_eps(alpha_g, beta_g)

(``alpha_g``, ``beta_g`` the normalised restrictions to group ``g``; the entropic offsets of the three debiased terms
cancel). Solving the small per-group problems in one padded batch is much cheaper than one problem over the whole
labelled cloud, and a bootstrap over source clusters only changes the source weights, so many replicates are solved
at once. The algorithm is geomloss's (symmetric log-domain updates, epsilon-scaling from ``diameter**2`` to
``blur**2`` by ``scaling**2``, a last extrapolation at ``blur``); ``tests/theory/test_theory.py`` checks it against
``labelled_divergence``.

Plain torch; no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ar.nn.sinkhorn import epsilon_schedule


@dataclass
class GroupedClouds:
    """Source and target points padded per group (see :func:`group_clouds`).

    Attributes:
        c_xy: ``[G, n, m]`` half squared distances source-target (padded entries 0).
        c_xx: ``[G, n, n]`` source-source.
        c_yy: ``[G, m, m]`` target-target.
        src_index: ``[G, n]`` index of each padded source slot into the source cloud (``-1``: padding).
        b: ``[G, m]`` uniform target weights within each group (0 on padding).
        diameter: Start of the epsilon-scaling descent.
    """

    c_xy: Tensor
    c_xx: Tensor
    c_yy: Tensor
    src_index: Tensor
    b: Tensor
    diameter: float


def _padded(points: Tensor, groups: Tensor, common: Tensor) -> tuple[Tensor, Tensor]:
    """``[G, k, D]`` points of each ``common`` group (zero-padded) and ``[G, k]`` their indices (``-1`` padding)."""
    member = groups[None, :] == common[:, None]  # (G, N)
    size = int(member.sum(1).max())
    rank = member.long().cumsum(1) - 1  # slot of each member within its group
    index = torch.full((len(common), size), -1, dtype=torch.long, device=points.device)
    g, j = member.nonzero(as_tuple=True)
    index[g, rank[g, j]] = j
    padded = points[index.clamp_min(0)] * (index >= 0)[..., None]  # (G, k, D)
    return padded, index


def _half_sq(x: Tensor, y: Tensor) -> Tensor:
    return ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1) / 2  # (G, n, m)


def group_clouds(z: Tensor, groups: Tensor, target: Tensor, target_groups: Tensor) -> GroupedClouds:
    """Pad source ``z`` ``[N, D]`` and ``target`` ``[M, D]`` per group present in both (float64).

    Source points of groups without target points are left out (as the labelled divergence does).
    """
    z, target = z.detach().double(), target.detach().to(z.device).double()
    target_groups = target_groups.to(groups.device)
    common = torch.unique(groups)[torch.isin(torch.unique(groups), target_groups)]
    if common.numel() == 0:
        raise ValueError("no (class, position) group has both produced and reference conditions")
    x, src_index = _padded(z, groups, common)
    y, tgt_index = _padded(target, target_groups, common)
    b = (tgt_index >= 0).double()
    b = b / b.sum(1, keepdim=True)
    both = torch.cat([z[torch.isin(groups, common)], target[torch.isin(target_groups, common)]])
    diameter = float((both.amax(0) - both.amin(0)).norm())
    return GroupedClouds(_half_sq(x, y), _half_sq(x, x), _half_sq(y, y), src_index, b, diameter)


def _softmin(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    """``-eps log sum_j exp(h_j - C_ij / eps)`` over the last axis of ``cost`` ``[..., n, m]``; ``h`` ``[..., m]``."""
    return -eps * torch.logsumexp(h[..., None, :] - cost / eps, dim=-1)


def _cross(cost: Tensor, a_log: Tensor, b_log: Tensor, eps_list: list[float]) -> tuple[Tensor, Tensor]:
    """Potentials ``(f [..., n], g [..., m])`` of ``OT_eps(a, b)`` (geomloss's symmetric loop and extrapolation)."""
    cost_t = cost.transpose(-1, -2)
    f, g = _softmin(eps_list[0], cost, b_log), _softmin(eps_list[0], cost_t, a_log)
    for eps in eps_list:
        f, g = 0.5 * (f + _softmin(eps, cost, b_log + g / eps)), 0.5 * (g + _softmin(eps, cost_t, a_log + f / eps))
    eps = eps_list[-1]
    return _softmin(eps, cost, b_log + g / eps), _softmin(eps, cost_t, a_log + f / eps)


def _self(cost: Tensor, a_log: Tensor, eps_list: list[float]) -> Tensor:
    """Potential ``[..., n]`` of the symmetric problem ``OT_eps(a, a)``."""
    f = _softmin(eps_list[0], cost, a_log)
    for eps in eps_list:
        f = 0.5 * (f + _softmin(eps, cost, a_log + f / eps))
    return _softmin(eps_list[-1], cost, a_log + f / eps_list[-1])


@torch.no_grad()
def grouped_divergence(clouds: GroupedClouds, weights: Tensor, blur: float, scaling: float = 0.5) -> Tensor:
    """Labelled Sinkhorn divergence for each row of source ``weights`` ``[R, N]`` (e.g. bootstrap counts).

    Args:
        clouds: From :func:`group_clouds`.
        weights: ``[R, N]`` non-negative source weights (ones: the plain divergence); each group's target mass is
            matched to the group's source mass, and groups with no source mass drop out.
        blur: Entropic blur ``sqrt(eps)`` (> 0).
        scaling: Epsilon-scaling ratio in ``(0, 1)``.

    Returns:
        ``[R]`` divergences (float64).
    """
    if not blur > 0:
        raise ValueError(f"blur must be > 0, got {blur}")
    eps_list = epsilon_schedule(max(clouds.diameter, blur), blur, scaling)
    valid = clouds.src_index >= 0  # (G, n)
    w = weights.double()[:, clouds.src_index.clamp_min(0)] * valid  # (R, G, n)
    mass = w.sum(-1)  # (R, G)
    # groups without mass get dummy uniform weights (finite potentials); their mass 0 removes them from the sum
    a = torch.where(mass[..., None] > 0, w / mass.clamp_min(1e-300)[..., None], valid / valid.sum(-1, keepdim=True))
    a_log, b_log = a.log(), clouds.b.log()  # log 0 = -inf marks padding
    f_ab, g_ab = _cross(clouds.c_xy, a_log, b_log.expand(len(w), -1, -1), eps_list)
    f_aa, g_bb = _self(clouds.c_xx, a_log, eps_list), _self(clouds.c_yy, b_log, eps_list)
    per_group = (a * (f_ab - f_aa)).nan_to_num().sum(-1) + (clouds.b * (g_ab - g_bb)).nan_to_num().sum(-1)  # (R, G)
    return (mass * per_group).sum(-1) / mass.sum(-1)
