"""The Wasserstein gradient of the Sinkhorn divergence at each particle, from one fused log-domain Sinkhorn solve.

The refinement flow (SPEC 2.3) needs, once per flow step and AR step, the gradient of ``S_eps(alpha, beta)`` with
respect to the source particles, for small clouds (tens to hundreds of points). geomloss computes it by autograd
through two ``SamplesLoss`` calls; at these sizes the cost is per-call overhead (argument handling, graph building,
backward), not arithmetic. The same quantity has a closed form: with the entropic plans written row-normalised,
``P_ij = softmax_j(log b_j + g_j / eps - C_ij / eps)``,

    grad_{x_i} S_eps / a_i = sum_j P^{xx}_ij x_j - sum_j P^{xy}_ij y_j = T_xx(x_i) - T_xy(x_i)

(the barycentric projections onto the source itself and onto the target; the target's self-transport does not
depend on ``x``). The potentials come from the same algorithm as geomloss's tensorized backend (symmetric updates,
epsilon-scaling from ``diameter**2`` to ``blur**2`` by factors ``scaling**2``, one last extrapolation at ``blur``),
run without autograd. ``tests/nn/test_refine.py`` checks the result against geomloss's autograd gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def epsilon_schedule(diameter: float, blur: float, scaling: float) -> list[float]:
    """Temperatures of the epsilon-scaling descent for the cost ``|x - y|^2 / 2`` (geomloss's schedule, p = 2).

    Returns ``[diameter**2, ...geometric steps of scaling**2..., blur**2]``.
    """
    start, stop, step = 2 * math.log(diameter), 2 * math.log(blur), 2 * math.log(scaling)
    count = max(0, math.ceil((stop - start) / step))  # numpy.arange(start, stop, step) length
    return [diameter**2] + [math.exp(start + i * step) for i in range(count)] + [blur**2]


def half_squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Cost matrix ``C_ij = |x_i - y_j|^2 / 2``, ``[N, M]``, for ``x`` ``[N, D]`` and ``y`` ``[M, D]``."""
    sq = x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T  # (N, M)
    return sq.clamp_min(0) / 2


_LOG_FLOOR = -80.0  # exp(-80) ~ 1.8e-35: still a normal float32, and negligible next to the row maximum's 1


def _shifted_kernel(z: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(z_ij - max_j z_ij)`` with exponents floored at -80, ``[N, M]``, and the row maxima ``[N, 1]``.

    Most kernel entries underflow at small epsilon, and CPU exponentials slow down several-fold on subnormal results
    (``torch.logsumexp`` and ``torch.softmax`` included); flooring the exponent keeps every result normal and
    changes a row sum (at least 1) by at most ``M * 1.8e-35``.
    """
    row_max = z.amax(1, keepdim=True)  # (N, 1)
    return z.sub_(row_max).clamp_min_(_LOG_FLOOR).exp_(), row_max


def _softmin(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    """Soft c-transform ``f_i = -eps * log sum_j exp(h_j - C_ij / eps)``, ``[N]``."""
    kernel, row_max = _shifted_kernel(torch.add(h[None, :], cost, alpha=-1.0 / eps))
    return -eps * (kernel.sum(1).log_() + row_max[:, 0])


def _cross_potential(cost: Tensor, a_log: Tensor, b_log: Tensor, eps_list: list[float]) -> Tensor:
    """Target-side potential ``g`` ``[M]`` of ``OT_eps(a, b)`` for the cost ``[N, M]`` (symmetric Sinkhorn updates)."""
    cost_t = cost.T.contiguous()
    f, g = _softmin(eps_list[0], cost, b_log), _softmin(eps_list[0], cost_t, a_log)
    for eps in eps_list:
        f, g = 0.5 * (f + _softmin(eps, cost, b_log + g / eps)), 0.5 * (g + _softmin(eps, cost_t, a_log + f / eps))
    return g


def _self_potential(cost: Tensor, a_log: Tensor, eps_list: list[float]) -> Tensor:
    """Potential ``f`` ``[N]`` of the symmetric problem ``OT_eps(a, a)`` for the cost ``[N, N]``."""
    f = _softmin(eps_list[0], cost, a_log)
    for eps in eps_list:
        f = 0.5 * (f + _softmin(eps, cost, a_log + f / eps))
    return f


def _projection(eps: float, cost: Tensor, h: Tensor, points: Tensor) -> Tensor:
    """Barycentric projection ``sum_j P_ij points_j`` with ``P = softmax_j(h_j - C_ij / eps)``, ``[N, K]``."""
    kernel, _ = _shifted_kernel(torch.add(h[None, :], cost, alpha=-1.0 / eps))
    return (kernel @ points) / kernel.sum(1, keepdim=True)


@torch.no_grad()
def divergence_flow_field(
    x: Tensor, y: Tensor, a: Tensor, b: Tensor, blur: float, scaling: float, diameter: float, dim: int | None = None
) -> Tensor:
    """Wasserstein gradient ``grad_{x_i} S_eps(alpha, beta) / a_i`` of the debiased Sinkhorn divergence.

    Args:
        x: ``[N, F]`` source points (moving coordinates first, then any fixed feature columns).
        y: ``[M, F]`` target points.
        a: ``[N]`` positive source weights summing to 1.
        b: ``[M]`` positive target weights summing to 1.
        blur: Entropic blur ``sqrt(eps)`` (> 0).
        scaling: Epsilon-scaling ratio in ``(0, 1)``.
        diameter: Start of the epsilon-scaling descent (>= ``blur``).
        dim: Number of leading (moving) coordinates to return; all ``F`` when ``None``.

    Returns:
        ``[N, dim]`` float32 field ``T_xx(x_i) - T_xy(x_i)``; the flow step is ``x <- x - eta * field``. Runs in
        float32 also inside an autocast region.
    """
    if not blur > 0:
        raise ValueError(f"blur must be > 0, got {blur}")
    if not 0 < scaling < 1:
        raise ValueError(f"scaling must be in (0, 1), got {scaling}")
    with torch.autocast(x.device.type, enabled=False):  # costs |x|^2 + |y|^2 - 2 x.y need float32 matmuls
        return _flow_field(x.float(), y.float(), a.float(), b.float(), blur, scaling, diameter, dim)


def _flow_field(x: Tensor, y: Tensor, a: Tensor, b: Tensor, blur: float, scaling: float, diameter: float,
                dim: int | None) -> Tensor:
    dim = x.shape[1] if dim is None else dim
    eps_list = epsilon_schedule(max(diameter, blur), blur, scaling)
    a_log, b_log = a.log(), b.log()
    c_xy, c_xx = half_squared_distances(x, y), half_squared_distances(x, x)  # (N, M), (N, N)
    g_xy, f_xx = _cross_potential(c_xy, a_log, b_log, eps_list), _self_potential(c_xx, a_log, eps_list)
    eps = eps_list[-1]
    to_self = _projection(eps, c_xx, a_log + f_xx / eps, x[:, :dim])  # (N, dim)
    to_target = _projection(eps, c_xy, b_log + g_xy / eps, y[:, :dim])  # (N, dim)
    return to_self - to_target
