"""Batch-independent OT refinement: an out-of-sample entropic map fitted once per AR step on a large pool.

The flow of :mod:`lightning_ar.nn.refine` transports each sampling batch on its own; with a few conditions per
``(class, position)`` group it shrinks them toward noisy group means, and a sample's output depends on the rest of
its batch (issue 15). Here the entropic OT problem between a large pool ``mu`` of produced conditions (the
generator's own sampling) and the target cloud ``nu`` (ideal, teacher-forced conditions) is solved once per AR step
with a converged log-domain Sinkhorn, and only what the map needs is kept: the target points with their dual
potential ``g`` and (debiased map) the pool points with the potential ``f`` of the symmetric problem ``OT(mu, mu)``.
A condition ``c`` then moves by

    T(c) = c + sum_j softmax_j(log b_j + (g_j - |c - y_j|^2 / 2) / eps) y_j
             - sum_i softmax_i(log a_i + (f_i - |c - x_i|^2 / 2) / eps) x_i

the out-of-sample entropic map onto the target minus its self-transport (the entropic bias): when ``mu == nu``
nothing moves in the population limit, at any ``eps``. ``debias=False`` gives the plain entropic map
``c -> sum_j P_j(c) y_j``. Costs are computed on labelled features (scaled one-hot class and position appended),
so that transport does not cross classes (or positions) when their weights are large; only the condition
coordinates move. Each condition's output depends on that condition alone.

Context-aware map (issue 15, item 2): with ``context_dim > 0`` each condition's features also carry its context
feature (:mod:`lightning_ar.nn.context_features`; for the target: that of the real context it was computed from),
scaled so that its within-group spread is ``context_weight`` times the conditions'. Transport is then between the
joint laws of (condition, context): a condition that is right in distribution but wrong for its context (the
``ContextShuffle`` control) lies off the target's joint law and is moved toward the conditions of targets with a
similar context, which a map on (class, position) alone cannot do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ar.nn.sinkhorn import epsilon_schedule, half_squared_distances


@dataclass(frozen=True)
class MapSettings:
    """Options of the entropic map.

    Attributes:
        blur_fraction: Blur ``sqrt(eps)`` as a fraction of the target's RMS within-(class, position) spread
            ``sqrt(E|y - mean_group(y)|^2)``; below 1 keeps the map local within a group.
        class_weight: Scale of the class one-hot feature (large: no transport across classes).
        position_weight: Scale of the position one-hot feature (0: positions are not labelled).
        debias: Subtract the pool's self-transport (see the module docstring).
        scaling: Epsilon-scaling ratio of the Sinkhorn descent.
        tolerance: Converged when the L1 marginal error of the plan (total mass 2) is below this.
        max_iter: Sinkhorn iterations at the final ``eps`` after the descent, at most.
        context_weight: Within-group spread of the appended context features relative to the conditions' (only for
            a map built with ``context_dim > 0``).
    """

    blur_fraction: float = 0.5
    class_weight: float = 100.0
    position_weight: float = 0.0
    debias: bool = True
    scaling: float = 0.7
    tolerance: float = 1e-2
    max_iter: int = 300
    context_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.blur_fraction > 0:
            raise ValueError(f"map blur_fraction must be > 0, got {self.blur_fraction}")
        for name in ("class_weight", "position_weight", "context_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"map {name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.scaling < 1:
            raise ValueError(f"map scaling must be in (0, 1), got {self.scaling}")
        if not self.tolerance > 0 or self.max_iter < 1:
            raise ValueError("map tolerance must be > 0 and max_iter >= 1")


@dataclass
class SinkhornSolution:
    """Dual potentials of ``OT_eps(a, b)`` and how well the plan's marginals match.

    Attributes:
        f: ``[N]`` source potential.
        g: ``[M]`` target potential.
        eps: Final temperature ``blur**2``.
        marginal_error: ``sum_i |P 1 - a|_i + sum_j |P^T 1 - b|_j`` of the final plan.
        iterations: Sinkhorn iterations run (descent included).
    """

    f: Tensor
    g: Tensor
    eps: float
    marginal_error: float
    iterations: int


def _lse(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    """``-eps * logsumexp_j(h_j - C_ij / eps)``, ``[N]``."""
    return -eps * torch.logsumexp(torch.add(h[None, :], cost, alpha=-1.0 / eps), dim=1)


def _marginal_error(cost: Tensor, f: Tensor, g: Tensor, a_log: Tensor, b_log: Tensor, eps: float) -> float:
    log_p = a_log[:, None] + b_log[None, :] + (f[:, None] + g[None, :] - cost) / eps  # (N, M)
    p = log_p.exp()
    return float((p.sum(1) - a_log.exp()).abs().sum() + (p.sum(0) - b_log.exp()).abs().sum())


@torch.no_grad()
def solve_entropic_ot(x: Tensor, y: Tensor, a: Tensor, b: Tensor, blur: float, scaling: float = 0.7,
                      tolerance: float = 1e-3, max_iter: int = 500) -> SinkhornSolution:
    """Converged log-domain Sinkhorn for the cost ``|x - y|^2 / 2`` (epsilon-scaling, then alternating updates).

    Args:
        x: ``[N, F]`` source points.
        y: ``[M, F]`` target points.
        a: ``[N]`` positive source weights summing to 1.
        b: ``[M]`` positive target weights summing to 1.
        blur: Final blur ``sqrt(eps)`` (> 0).
        scaling: Epsilon-scaling ratio in ``(0, 1)``.
        tolerance: Stop when the L1 marginal error is below it (checked every 10 iterations).
        max_iter: Alternating updates at the final ``eps``, at most.

    Returns:
        :class:`SinkhornSolution` (float32 potentials).
    """
    if not blur > 0:
        raise ValueError(f"blur must be > 0, got {blur}")
    x, y = x.float(), y.float()
    cost = half_squared_distances(x, y)  # (N, M)
    a_log, b_log = a.float().log(), b.float().log()
    diameter = max(float((torch.cat([x, y]).amax(0) - torch.cat([x, y]).amin(0)).norm()), blur)
    eps_list = epsilon_schedule(diameter, blur, scaling)
    f, g = _lse(eps_list[0], cost, b_log), _lse(eps_list[0], cost.T, a_log)
    for eps in eps_list:  # symmetric updates down the schedule (geomloss's scheme)
        f, g = 0.5 * (f + _lse(eps, cost, b_log + g / eps)), 0.5 * (g + _lse(eps, cost.T, a_log + f / eps))
    eps, iterations = eps_list[-1], len(eps_list)
    error = _marginal_error(cost, f, g, a_log, b_log, eps)
    for i in range(max_iter):
        if error < tolerance:
            break
        f = _lse(eps, cost, b_log + g / eps)
        g = _lse(eps, cost.T, a_log + f / eps)
        iterations += 1
        if i % 10 == 9 or i == max_iter - 1:
            error = _marginal_error(cost, f, g, a_log, b_log, eps)
    return SinkhornSolution(f, g, eps, error, iterations)


@torch.no_grad()
def solve_self_ot(x: Tensor, a: Tensor, blur: float, scaling: float = 0.7, tolerance: float = 1e-3,
                  max_iter: int = 500) -> SinkhornSolution:
    """Potential of the symmetric problem ``OT_eps(a, a)`` (``f == g``), by averaged fixed-point updates."""
    x = x.float()
    cost = half_squared_distances(x, x)  # (N, N)
    a_log = a.float().log()
    diameter = max(float((x.amax(0) - x.amin(0)).norm()), blur)
    eps_list = epsilon_schedule(diameter, blur, scaling)
    f = _lse(eps_list[0], cost, a_log)
    for eps in eps_list:
        f = 0.5 * (f + _lse(eps, cost, a_log + f / eps))
    eps, iterations = eps_list[-1], len(eps_list)
    error = _marginal_error(cost, f, f, a_log, a_log, eps)
    for i in range(max_iter):
        if error < tolerance:
            break
        f = 0.5 * (f + _lse(eps, cost, a_log + f / eps))
        iterations += 1
        if i % 10 == 9 or i == max_iter - 1:
            error = _marginal_error(cost, f, f, a_log, a_log, eps)
    return SinkhornSolution(f, f, eps, error, iterations)


def labelled_features(z: Tensor, positions: Tensor, seq_len: int, position_weight: float) -> Tensor:
    """``[N, D]`` conditions with the weighted position one-hot appended, ``[N, D + L]``."""
    pos = F.one_hot(positions.long(), seq_len).float() * position_weight  # (N, L)
    return torch.cat([z.float(), pos.to(z.device)], dim=1)


def within_group_spread(z: Tensor, groups: Tensor) -> float:
    """RMS distance ``sqrt(mean |z - mean_group(z)|^2)`` of ``z`` ``[N, D]`` to its group means."""
    ids, inverse = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(len(ids), z.shape[1], dtype=torch.float64, device=z.device).index_add_(0, inverse, z.double())
    counts = torch.bincount(inverse, minlength=len(ids)).double()[:, None]
    return float((z.double() - (sums / counts)[inverse]).pow(2).sum(1).mean().sqrt())


@dataclass
class StepMap:
    """What the map of one AR step needs (see the module docstring); transport stays within a class.

    Attributes:
        targets: ``[M, F]`` target features (the first ``D`` columns are conditions).
        target_logit: ``[M]`` ``log b_j + g_j / eps`` of the target's class block (``b`` uniform within it).
        target_class: ``[M]`` class of each target point.
        pool: ``[N, F]`` pool features (``None`` for the plain map).
        pool_logit: ``[N]`` ``log a_i + f_i / eps`` of the symmetric problem of the pool's class block.
        pool_class: ``[N]`` class of each pool point.
        eps: Temperature (``blur**2``).
        marginal_error: Largest L1 marginal error of the per-class solves.
    """

    targets: Tensor
    target_logit: Tensor
    target_class: Tensor
    pool: Tensor | None
    pool_logit: Tensor | None
    pool_class: Tensor | None
    eps: float
    marginal_error: float


def _projection(c: Tensor, points: Tensor, logit: Tensor, eps: float, dim: int) -> Tensor:
    """``sum_j softmax_j(logit_j - |c - p_j|^2 / (2 eps)) p_j[:dim]`` for ``c`` ``[n, F]`` -> ``[n, dim]``."""
    scores = torch.add(logit[None, :], half_squared_distances(c, points), alpha=-1.0 / eps)  # (n, M)
    return torch.softmax(scores, dim=1) @ points[:, :dim]


def fit_step_map(pool: Tensor, pool_class: Tensor, target: Tensor, target_class: Tensor, blur: float,
                 settings: MapSettings) -> StepMap:
    """Solve ``OT_eps(pool_c, target_c)`` (and ``OT_eps(pool_c, pool_c)`` when debiased) for each class ``c``.

    Weights are uniform within a class block.

    Args:
        pool: ``[N, F]`` produced conditions (features).
        pool_class: ``[N]`` their classes.
        target: ``[M, F]`` ideal conditions (features).
        target_class: ``[M]`` their classes; pool points of a class without target points are left out (the map
            leaves such conditions unchanged).
        blur: ``sqrt(eps)``.
        settings: Solver options.
    """
    target_logit = torch.full((len(target),), -math.inf, device=target.device)
    pool_logit = torch.full((len(pool),), -math.inf, device=pool.device)
    errors = []
    for c in torch.unique(pool_class).tolist():
        src, tgt = (pool_class == c).nonzero()[:, 0], (target_class == c).nonzero()[:, 0]
        if len(tgt) == 0:
            continue
        a = torch.full((len(src),), 1.0 / len(src), device=pool.device)
        b = torch.full((len(tgt),), 1.0 / len(tgt), device=pool.device)
        cross = solve_entropic_ot(pool[src], target[tgt], a, b, blur, settings.scaling, settings.tolerance,
                                  settings.max_iter)
        target_logit[tgt] = b.log() + cross.g / cross.eps
        errors.append(cross.marginal_error)
        if settings.debias:
            own = solve_self_ot(pool[src], a, blur, settings.scaling, settings.tolerance, settings.max_iter)
            pool_logit[src] = a.log() + own.f / own.eps
            errors.append(own.marginal_error)
    debiased = settings.debias
    return StepMap(target.float(), target_logit, target_class, pool.float() if debiased else None,
                   pool_logit if debiased else None, pool_class if debiased else None, blur**2,
                   max(errors, default=0.0))


def apply_step_map(step: StepMap, c: Tensor, c_class: Tensor, dim: int, chunk: int = 4096) -> Tensor:
    """Map condition features ``c`` ``[n, F]`` of classes ``c_class`` ``[n]`` -> refined ``[n, dim]``.

    Each row is mapped on its own, against the points of its class only (chunks only bound the memory); rows of a
    class the map has no target points for are returned unchanged.
    """
    out = torch.empty(len(c), dim, device=c.device)
    for cls in torch.unique(c_class).tolist():
        rows = (c_class == cls).nonzero()[:, 0]
        tgt = ((step.target_class == cls) & torch.isfinite(step.target_logit)).nonzero()[:, 0]
        if len(tgt) == 0:
            out[rows] = c[rows, :dim].float()
            continue
        own = ((step.pool_class == cls) & torch.isfinite(step.pool_logit)).nonzero()[:, 0] \
            if step.pool is not None else None
        for part in rows.split(chunk):
            x = c[part].float()
            moved = _projection(x, step.targets[tgt], step.target_logit[tgt], step.eps, dim)
            if own is not None:
                moved = x[:, :dim] + moved - _projection(x, step.pool[own], step.pool_logit[own], step.eps, dim)
            out[part] = moved
    return out


UNFITTED, FITTED, IDENTITY = 0, 1, 2


class EntropicMap(nn.Module):
    """Per-AR-step entropic maps, stored as buffers (saved in the holder's ``state_dict``).

    Buffers (``K`` steps, ``M`` target slots, ``N`` pool slots, ``F = D + L + Fc`` features): ``targets``
    ``[K, M, F]``,
    ``target_logit`` ``[K, M]`` (``-inf`` in unused slots), ``target_class`` ``[K, M]``, ``pool`` ``[K, N, F]``,
    ``pool_logit`` ``[K, N]``, ``pool_class`` ``[K, N]``, ``eps`` ``[K]``, ``marginal_error`` ``[K]``, ``status``
    ``[K]`` (0 unfitted, 1 fitted, 2 identity: the step's conditions have no within-group spread, e.g. step 0,
    whose context is empty); with ``context_dim = Fc > 0`` also ``context_scale`` ``[K]`` (the factor each step's
    context features were scaled by).
    """

    def __init__(self, num_steps: int, target_slots: int, pool_slots: int, dim: int, seq_len: int,
                 settings: MapSettings | None = None, context_dim: int = 0) -> None:
        """Create an unfitted map.

        Args:
            num_steps: AR steps ``K``.
            target_slots: Target points kept per step (the condition bank's capacity).
            pool_slots: Pool points kept per step.
            dim: Condition dimension ``D``.
            seq_len: Token positions ``L`` (position one-hot).
            settings: Map options.
            context_dim: Dimension ``Fc`` of the context features (0: the map sees (class, position) only).
        """
        super().__init__()
        for name, value in (("num_steps", num_steps), ("target_slots", target_slots), ("pool_slots", pool_slots),
                            ("dim", dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {context_dim}")
        self.dim, self.seq_len, self.context_dim = dim, seq_len, context_dim
        self.settings = settings or MapSettings()
        feat = dim + seq_len + context_dim
        self.register_buffer("targets", torch.zeros(num_steps, target_slots, feat))
        self.register_buffer("target_logit", torch.full((num_steps, target_slots), -math.inf))
        self.register_buffer("target_class", torch.zeros(num_steps, target_slots, dtype=torch.long))
        self.register_buffer("pool", torch.zeros(num_steps, pool_slots, feat))
        self.register_buffer("pool_logit", torch.full((num_steps, pool_slots), -math.inf))
        self.register_buffer("pool_class", torch.zeros(num_steps, pool_slots, dtype=torch.long))
        self.register_buffer("eps", torch.zeros(num_steps))
        self.register_buffer("marginal_error", torch.full((num_steps,), math.nan))
        self.register_buffer("status", torch.zeros(num_steps, dtype=torch.long))
        # the position weight the stored features were built with (a later MapSettings does not change them)
        self.register_buffer("position_weight", torch.full((num_steps,), float(self.settings.position_weight)))
        if context_dim:
            self.register_buffer("context_scale", torch.zeros(num_steps))

    @property
    def num_steps(self) -> int:
        """AR steps ``K``."""
        return self.status.shape[0]

    def fitted(self, step: int) -> bool:
        """Whether AR step ``step`` has a map (or is the identity by construction)."""
        return int(self.status[step]) != UNFITTED

    @property
    def uses_context(self) -> bool:
        """Whether the map's features include the conditions' context features (``context_dim > 0``)."""
        return self.context_dim > 0

    def features(self, z: Tensor, positions: Tensor, step: int | None = None, context: Tensor | None = None
                 ) -> Tensor:
        """Features ``[N, F]`` of conditions ``z`` ``[N, D]`` at token ``positions`` ``[N]`` (with the position
        weight and context scale AR step ``step`` was fitted with; the current settings' weight and scale 1 when
        ``None``), with the context features ``context`` ``[N, Fc]`` appended for a context-aware map."""
        weight = self.settings.position_weight if step is None else float(self.position_weight[step])
        feats = labelled_features(z, positions, self.seq_len, weight)
        if not self.context_dim:
            return feats
        if context is None or context.shape != (len(z), self.context_dim):
            raise ValueError(f"this entropic map is context-aware (context_dim={self.context_dim}): pass the "
                             f"conditions' context features [N, {self.context_dim}], got "
                             f"{None if context is None else tuple(context.shape)}")
        scale = 1.0 if step is None else float(self.context_scale[step])
        return torch.cat([feats, context.float().to(feats.device) * scale], dim=1)

    def _context_scale(self, ctx_t: Tensor | None, groups: Tensor, spread: float) -> float:
        """``context_weight * spread(z) / spread(context)`` within (class, position) groups (0 if no spread)."""
        if ctx_t is None:
            raise ValueError(f"this entropic map is context-aware (context_dim={self.context_dim}): fit_step needs "
                             "the pool's and the target's context features")
        ctx_spread = within_group_spread(ctx_t.float(), groups)
        return self.settings.context_weight * spread / ctx_spread if ctx_spread > 1e-12 else 0.0

    def fit_step(self, step: int, pool: tuple[Tensor, Tensor, Tensor], target: tuple[Tensor, Tensor, Tensor],
                 pool_context: Tensor | None = None, target_context: Tensor | None = None) -> float:
        """Fit AR step ``step`` from a pool ``(z [N, D], labels [N], positions [N])`` and a target of the same form.

        The blur is ``settings.blur_fraction`` times the target's within-(class, position) RMS spread; a step whose
        target has no such spread (all conditions of a group identical) is the identity. A context-aware map also
        needs ``pool_context`` ``[N, Fc]`` and ``target_context`` ``[M, Fc]``. Returns the marginal error of the
        solves (0 for an identity step), also kept in ``marginal_error``.
        """
        z_p, z_t = pool[0], target[0]
        if len(z_p) > self.pool.shape[1] or len(z_t) > self.targets.shape[1]:
            raise ValueError(f"map step {step}: pool {len(z_p)} / target {len(z_t)} points exceed the map's slots "
                             f"({self.pool.shape[1]} / {self.targets.shape[1]})")
        spread = within_group_spread(z_t, target[1] * self.seq_len + target[2])
        scale = float(z_t.double().pow(2).sum(1).mean().sqrt())
        self._clear(step)
        if not spread > 1e-6 * max(scale, 1e-12):
            self.status[step], self.marginal_error[step] = IDENTITY, 0.0
            return 0.0
        self.position_weight[step] = self.settings.position_weight
        if self.context_dim:
            self.context_scale[step] = self._context_scale(target_context, target[1] * self.seq_len + target[2],
                                                           spread)
        fitted = fit_step_map(self.features(z_p, pool[2], step, pool_context), pool[1],
                              self.features(z_t, target[2], step, target_context), target[1],
                              self.settings.blur_fraction * spread, self.settings)
        self.targets[step, : len(z_t)] = fitted.targets
        self.target_logit[step, : len(z_t)] = fitted.target_logit
        self.target_class[step, : len(z_t)] = fitted.target_class
        if fitted.pool is not None:
            self.pool[step, : len(z_p)] = fitted.pool
            self.pool_logit[step, : len(z_p)] = fitted.pool_logit
            self.pool_class[step, : len(z_p)] = fitted.pool_class
        self.eps[step], self.marginal_error[step], self.status[step] = fitted.eps, fitted.marginal_error, FITTED
        return fitted.marginal_error

    def _clear(self, step: int) -> None:
        self.targets[step].zero_()
        self.target_logit[step].fill_(-math.inf)
        self.pool[step].zero_()
        self.pool_logit[step].fill_(-math.inf)

    def step_map(self, step: int) -> StepMap:
        """The stored map of AR step ``step`` (unused slots dropped)."""
        if int(self.status[step]) != FITTED:
            raise ValueError(f"the entropic map of AR step {step} is not fitted (OTRefinement.fit_map)")
        used_t, used_p = torch.isfinite(self.target_logit[step]), torch.isfinite(self.pool_logit[step])
        has_pool = bool(used_p.any())
        return StepMap(self.targets[step][used_t], self.target_logit[step][used_t], self.target_class[step][used_t],
                       self.pool[step][used_p] if has_pool else None,
                       self.pool_logit[step][used_p] if has_pool else None,
                       self.pool_class[step][used_p] if has_pool else None,
                       float(self.eps[step]), float(self.marginal_error[step]))

    def forward(self, z: Tensor, labels: Tensor, positions: Tensor, step: int, context: Tensor | None = None
                ) -> Tensor:
        """Refined conditions ``[N, D]`` for ``z`` ``[N, D]`` (classes ``labels`` ``[N]``, token ``positions``
        ``[N]``, for a context-aware map their context features ``context`` ``[N, Fc]``) at AR step ``step``, in
        ``z``'s dtype; each condition's output depends on it (and its context) alone."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps - 1}], got {step}")
        if int(self.status[step]) == IDENTITY:
            return z
        mapped = apply_step_map(self.step_map(step), self.features(z, positions, step, context), labels.long(),
                                self.dim)
        return mapped.to(z.dtype)
