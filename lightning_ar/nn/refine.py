"""Optimal-transport refinement of AR conditions: the Sinkhorn gradient flow (the bank and the amortised refiner
live in :mod:`lightning_ar.nn.condition_bank` and :mod:`lightning_ar.nn.amortized_refiner`).

This is this project's concrete reading of the condition refinement of Zhou, Li and Shen (ICLR 2026), as fixed
in SPEC section 2.3: at AR step ``k`` the conditions ``C0`` of the tokens being predicted are moved by explicit
steps of the Wasserstein gradient flow of ``F(C) = S_eps(C, Y_k) + lam/2 * mean ||C - C0||^2``, where ``S_eps``
is the debiased Sinkhorn divergence and ``Y_k`` are ideal (teacher-forced) conditions of that step, kept in a
:class:`~lightning_ar.nn.condition_bank.ConditionBank`. Transport never crosses classes or token positions: the
target's mass is matched per ``(class, position)`` group and scaled one-hot features are appended to both clouds
(labelled OT).
:class:`~lightning_ar.nn.amortized_refiner.AmortizedRefiner` is the cheap learned alternative (one MLP pass per
step).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from geomloss import SamplesLoss
from torch import Tensor

from lightning_ar.nn.amortized_refiner import AmortizedRefiner  # noqa: F401  (its own home since issue 15 item 7)
from lightning_ar.nn.condition_bank import ConditionBank  # noqa: F401  (idem; both stay importable from here)
from lightning_ar.nn.labelled_conditions import LabelledConditions
from lightning_ar.nn.sinkhorn import divergence_flow_field

SCHEDULES = ("constant", "harmonic")


def scheduled_step(eta: float, schedule: str, j: int) -> float:
    """Step ``j``'s (0-based) size: ``eta`` (``constant``) or ``eta / (j + 1)`` (``harmonic``)."""
    return eta if schedule == "constant" else eta / (j + 1)


@dataclass(frozen=True)
class FlowOptions:
    """Options of the Sinkhorn gradient flow (SPEC 2.3), validated on construction (errors name the field).

    Attributes:
        steps: Number of flow steps ``K`` (>= 0).
        eta: Step size (> 0; 1 moves each point onto its entropic transport target when ``lam = 0``).
        blur: Entropic blur of the divergence (> 0, in condition units).
        scaling: Epsilon-scaling ratio of the Sinkhorn solver, in ``(0, 1)``.
        lam: Strength (>= 0) of the proximity term pulling ``C`` back to ``C0``.
        schedule: Step sizes: ``constant`` (every step ``eta``) or ``harmonic`` (step ``j`` is ``eta / (j + 1)``).
    """

    steps: int = 10
    eta: float = 1.0
    blur: float = 0.05
    scaling: float = 0.9
    lam: float = 0.0
    schedule: str = "constant"

    def __post_init__(self) -> None:
        rules = (("steps", self.steps >= 0, ">= 0"), ("eta", self.eta > 0, "> 0"), ("blur", self.blur > 0, "> 0"),
                 ("scaling", 0 < self.scaling < 1, "in (0, 1)"), ("lam", self.lam >= 0, ">= 0"))
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"flow {name} must be {rule}, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"flow schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def step_size(self, j: int) -> float:
        """The step size of step ``j`` (0-based)."""
        return scheduled_step(self.eta, self.schedule, j)

    def replace(self, **changes: Any) -> FlowOptions:
        """A copy with ``changes`` (validated; an unknown name is a ``TypeError`` naming it)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown flow option(s) {unknown}; they are {[f.name for f in fields(self)]}")
        return replace(self, **changes)


@dataclass
class RefinementResult:
    """Output of a refinement flow.

    Attributes:
        conditions: ``[N, D]`` refined conditions (input dtype).
        trace: ``[K+1]`` Sinkhorn divergence before each of the ``K`` steps and after the last.
        unmoved: Points left unchanged because their ``(class, position)`` group has no target mass.
    """

    conditions: Tensor
    trace: Tensor
    unmoved: int = 0


def _all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (one reduction: ``amax`` propagates NaN and inf; several times faster
    on CPU than ``torch.isfinite(t).all()``)."""
    return t.numel() == 0 or bool(torch.isfinite(t.detach().abs().amax()))


def _check_clouds(x: Tensor, y: Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` ``[N, D]`` and ``y`` ``[M, D]`` are 2-D, finite and of equal ``D``."""
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"conditions and target must be [N, D] and [M, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"conditions have dimension {x.shape[1]} but the target has dimension {y.shape[1]}")
    for name, t in (("conditions", x), ("target", y)):
        if not _all_finite(t):
            raise ValueError(f"{name} must be finite (found NaN or inf)")


def sinkhorn_divergence(
    x: Tensor, y: Tensor, blur: float = 0.05, scaling: float = 0.9, a: Tensor | None = None, b: Tensor | None = None
) -> Tensor:
    """Debiased Sinkhorn divergence ``S_eps(x, y)`` with cost ``|x - y|^2 / 2`` (geomloss, tensorized backend).

    Args:
        x: ``[N, D]`` source points.
        y: ``[M, D]`` target points.
        blur: Entropic blur ``sqrt(eps)``, in the units of the points; must be > 0.
        scaling: Epsilon-scaling ratio of geomloss, in ``(0, 1)``.
        a: ``[N]`` source weights summing to 1 (uniform when ``None``).
        b: ``[M]`` target weights summing to 1 (uniform when ``None``).

    Returns:
        Scalar divergence, differentiable with respect to ``x`` and ``y``.
    """
    if not blur > 0:
        raise ValueError(f"blur must be > 0, got {blur}")
    if not 0 < scaling < 1:
        raise ValueError(f"scaling must be in (0, 1), got {scaling}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"conditions have dimension {x.shape[-1]} but the target has dimension {y.shape[-1]}")
    loss = _samples_loss(x, y, blur, scaling)
    if a is None and b is None:
        return loss(x, y)
    a = torch.full_like(x[:, 0], 1.0 / len(x)) if a is None else a.to(x)
    b = torch.full_like(y[:, 0], 1.0 / len(y)) if b is None else b.to(y)
    return loss(a, x, b, y)


def _samples_loss(x: Tensor, y: Tensor, blur: float, scaling: float) -> SamplesLoss:
    """geomloss debiased Sinkhorn loss (cost ``|x-y|^2/2``) with the epsilon-scaling range fixed.

    Epsilon-scaling starts at the diameter of both clouds, at least ``blur``: geomloss would otherwise derive it from
    the points, and coincident points (a single point, or identical ones) give a zero diameter and a
    ``log(0)``-long epsilon schedule.
    """
    diameter = max(_diameter(x.detach(), y.detach()), blur)
    return SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=True, diameter=diameter,
                       backend="tensorized")


def labelled(z: Tensor, labels: Tensor, positions: Tensor, num_classes: int, seq_len: int, weight: float) -> Tensor:
    """Append ``weight``-scaled one-hot class and position features (labelled OT).

    Moving mass across a class (or position) costs ``weight**2`` more, so a large ``weight`` stops it.

    Args:
        z: ``[N, D]`` points.
        labels: ``[N]`` class labels in ``[0, num_classes)``.
        positions: ``[N]`` token positions in ``[0, seq_len)``.
        num_classes: Number of classes.
        seq_len: Number of token positions.
        weight: Scale of the one-hot features.

    Returns:
        ``[N, D + num_classes + seq_len]`` points.
    """
    onehot_y = F.one_hot(labels.long(), num_classes).to(z)  # (N, num_classes)
    onehot_p = F.one_hot(positions.long(), seq_len).to(z)  # (N, seq_len)
    return torch.cat([z, weight * onehot_y, weight * onehot_p], dim=1)


def group_matched_weights(src_groups: Tensor, tgt_groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Source and target weights with equal mass per group.

    Args:
        src_groups: ``[N]`` integer group ids of the source points (e.g. ``label * seq_len + position``).
        tgt_groups: ``[M]`` integer group ids of the target points.

    Returns:
        ``a`` ``[N]`` uniform over the kept source points (0 elsewhere), ``b`` ``[M]`` giving each target group the
        source's mass in that group, uniform within the group (0 for groups absent from the source), and
        ``keep_src`` ``[N]`` bool, False for source points whose group has no target point. ``a`` and ``b`` sum to
        1, or are all zero when no source point is kept.
    """
    keep_src = torch.isin(src_groups, tgt_groups)  # (N,)
    groups, inverse = torch.unique(torch.cat([src_groups, tgt_groups]), return_inverse=True)
    src_idx, tgt_idx = inverse[: len(src_groups)], inverse[len(src_groups) :]
    a = keep_src.float() / keep_src.sum().clamp_min(1)  # (N,)
    src_mass = torch.zeros(len(groups), device=a.device).index_add_(0, src_idx, a)  # (G,)
    tgt_count = torch.bincount(tgt_idx, minlength=len(groups)).float()  # (G,)
    b = (src_mass / tgt_count.clamp_min(1))[tgt_idx]  # (M,)
    return a, b, keep_src


def _check_weights(a: Tensor | None, n: int) -> None:
    """Raise ``ValueError`` unless the source weights ``a`` are ``[n]`` and positive."""
    if a is not None and (a.shape != (n,) or not bool((a > 0).all())):
        raise ValueError(f"a must be [N={n}] with positive entries (drop zero-weight points first)")


def _extend(c: Tensor, extra: Tensor | None) -> Tensor:
    """``[N, D]`` -> ``[N, D + E]`` with the fixed feature columns ``extra`` ``[N, E]`` appended."""
    return c if extra is None else torch.cat([c, extra], dim=1)


def _value(c: Tensor, y: Tensor, extra: Tensor | None, opts: FlowOptions, a: Tensor, b: Tensor) -> Tensor:
    """Divergence ``S_eps`` at ``c`` ``[N, D]`` (detached scalar; a measurement for the trace)."""
    with torch.no_grad():
        return sinkhorn_divergence(_extend(c, extra), y, opts.blur, opts.scaling, a, b).detach()


def sinkhorn_flow(
    c0: Tensor,
    target: Tensor,
    options: FlowOptions | None = None,
    *,
    a: Tensor | None = None,
    b: Tensor | None = None,
    extra: tuple[Tensor, Tensor] | None = None,
    record_trace: bool = True,
    **overrides: Any,
) -> RefinementResult:
    """Explicit Wasserstein gradient flow of ``S_eps(C, Y) + lam/2 * mean ||C - C0||^2`` (SPEC 2.3).

    Each step is ``C <- C - eta_j * (G + lam * (C - C0))`` (``eta_j``: ``options.schedule``) with
    ``G = grad_C S / a`` (``N * grad`` for uniform weights), the Wasserstein gradient at each particle, computed in
    closed form from one fused Sinkhorn solve (:func:`~lightning_ar.nn.sinkhorn.divergence_flow_field`; no
    autograd). Runs in float32.

    Args:
        c0: ``[N, D]`` initial conditions.
        target: ``[M, D]`` target samples ``Y``.
        options: The flow's :class:`FlowOptions` (its defaults when ``None``).
        a: ``[N]`` positive source weights summing to 1 (uniform when ``None``).
        b: ``[M]`` target weights summing to 1 (uniform when ``None``).
        extra: ``([N, E], [M, E])`` fixed feature columns appended to ``C`` and to ``Y`` for the divergence, never
            moved (e.g. the labelled one-hots).
        record_trace: Measure the divergence before each step and after the last (``K + 1`` extra debiased
            Sinkhorn solves, a measurement only); without it the trace is empty. The flow itself is the same.
        **overrides: Fields of ``options`` to change (``steps=3``, ...).

    Returns:
        :class:`RefinementResult` with ``[N, D]`` conditions and the ``[K+1]`` divergence trace (``[0]`` without
        ``record_trace``).
    """
    opts = (options or FlowOptions()).replace(**overrides)
    _check_clouds(c0, target)
    _check_weights(a, len(c0))
    # the trace's geomloss solve enables autograd internally: clone the inputs out of inference mode (e.g. inside
    # Lightning's test loop) so that this is allowed
    with torch.inference_mode(False):
        init = c0.detach().float().clone()  # (N, D)
        extra_src, extra_tgt = (None, None) if extra is None else (t.detach().float().clone() for t in extra)
        y = _extend(target.detach().float().clone(), extra_tgt)  # (M, D + E)
        a_flow = torch.full_like(init[:, 0], 1.0 / len(init)) if a is None else a.float().clone()  # (N,)
        b_flow = torch.full_like(y[:, 0], 1.0 / len(y)) if b is None else b.float().clone()  # (M,)
        c, trace = _run_flow(init, y, extra_src, a_flow, b_flow, opts, record_trace, _diameter(init, target.float()))
    if not _all_finite(c):
        raise ValueError(f"the flow diverged (non-finite conditions); reduce eta={opts.eta} or lam={opts.lam}")
    trace = torch.stack(trace) if trace else init.new_zeros(0)
    return RefinementResult(conditions=c.to(c0.dtype), trace=trace)


def _run_flow(init: Tensor, y: Tensor, extra: Tensor | None, a: Tensor, b: Tensor, opts: FlowOptions,
              record_trace: bool, diameter: float) -> tuple[Tensor, list[Tensor]]:
    """The flow's steps from ``init`` ``[N, D]`` toward ``y`` ``[M, D + E]``: final ``[N, D]`` and the trace.

    Epsilon-scaling starts at ``diameter``, that of the moving coordinates only: fixed feature columns (labels) only
    separate groups whose masses are matched anyway, so annealing over their scale would be wasted iterations.
    """
    c, trace = init, []
    for j in range(opts.steps):
        if record_trace:
            trace.append(_value(c, y, extra, opts, a, b))
        field = divergence_flow_field(_extend(c, extra), y, a, b, opts.blur, opts.scaling, diameter, c.shape[1])
        c = c - opts.step_size(j) * (field + opts.lam * (c - init))  # (N, D)
    if record_trace:
        trace.append(_value(c, y, extra, opts, a, b))
    return c, trace


@dataclass
class LabelledClouds:
    """Source and target clouds prepared for class- and position-aware transport (see :func:`labelled_clouds`).

    Attributes:
        keep: ``[N]`` source points whose (class, position) group has target points.
        used: ``[M]`` target points of groups present in the source.
        a: ``[N]`` source weights (0 where not kept); ``a[keep]`` sums to 1.
        b: ``[M]`` target weights matching the source's mass per group; ``b[used]`` sums to 1.
        src: ``[n, D + C + L]`` kept source points with the scaled one-hots (``None`` when nothing is kept).
        tgt: ``[m, D + C + L]`` used target points with the scaled one-hots.
    """

    keep: Tensor
    used: Tensor
    a: Tensor
    b: Tensor
    src: Tensor | None
    tgt: Tensor | None


def labelled_clouds(
    source: LabelledConditions,
    target: LabelledConditions,
    num_classes: int,
    seq_len: int,
    blur: float,
    label_weight: float | None = None,
) -> LabelledClouds:
    """Group-matched weights and labelled features shared by the flow and by divergence measurements.

    ``label_weight=None`` picks the diameter of both clouds (at least ``10 * blur``), which makes crossing a group
    costlier than any move within one.
    """
    a, b, keep = group_matched_weights(source.groups(seq_len), target.groups(seq_len))
    used = b > 0  # (M,)
    if not bool(keep.any()):
        return LabelledClouds(keep, used, a, b, None, None)
    src_z, tgt_z = source.conditions[keep].float(), target.conditions[used].float()
    weight = max(_diameter(src_z.detach(), tgt_z), 10 * blur) if label_weight is None else label_weight
    src = labelled(src_z, source.labels[keep], source.positions[keep], num_classes, seq_len, weight)  # (n, D+C+L)
    tgt = labelled(tgt_z, target.labels[used], target.positions[used], num_classes, seq_len, weight)  # (m, ...)
    return LabelledClouds(keep, used, a, b, src, tgt)


def refine_conditions(
    source: LabelledConditions,
    target: LabelledConditions,
    num_classes: int,
    seq_len: int,
    options: FlowOptions | None = None,
    *,
    label_weight: float | None = None,
    record_trace: bool = True,
    **overrides: Any,
) -> RefinementResult:
    """Class- and position-aware Sinkhorn flow of the ``source`` conditions toward the ``target`` ones.

    Target mass is matched per ``(class, position)`` group to the source's (:func:`group_matched_weights`) and
    ``label_weight``-scaled one-hot features are appended to both clouds as fixed columns. Points whose group has
    no target point are returned unchanged and counted in ``unmoved``.

    Args:
        source: Produced conditions ``[N, D]`` with their labels and positions ``[N]``.
        target: Ideal conditions ``[M, D]`` with their labels and positions ``[M]``.
        num_classes: Number of classes.
        seq_len: Number of token positions.
        options: The flow's :class:`FlowOptions` (its defaults when ``None``).
        label_weight: Scale of the one-hot features; ``None`` picks the diameter of both clouds (at least
            ``10 * blur``), which makes crossing a group costlier than any move within one.
        record_trace: Measure the divergence along the flow (see :func:`sinkhorn_flow`).
        **overrides: Fields of ``options`` to change (``steps=3``, ...).

    Returns:
        :class:`RefinementResult`; the trace is all zeros when no point has target mass.
    """
    z = source.conditions
    _check_clouds(z, target.conditions)
    if label_weight is not None and not label_weight >= 0:
        raise ValueError(f"label_weight must be >= 0, got {label_weight}")
    opts = (options or FlowOptions()).replace(**overrides)
    clouds = labelled_clouds(source, target, num_classes, seq_len, opts.blur, label_weight)
    out, unmoved = z.clone(), int((~clouds.keep).sum())
    if clouds.src is None:
        length = opts.steps + 1 if record_trace else 0
        return RefinementResult(conditions=out, trace=z.new_zeros(length, dtype=torch.float32), unmoved=unmoved)
    keep, used, d = clouds.keep, clouds.used, z.shape[1]
    result = sinkhorn_flow(z[keep], target.conditions[used], opts, a=clouds.a[keep], b=clouds.b[used],
                           extra=(clouds.src[:, d:], clouds.tgt[:, d:]), record_trace=record_trace)
    out[keep] = result.conditions
    return RefinementResult(conditions=out, trace=result.trace, unmoved=unmoved)


def _diameter(x: Tensor, y: Tensor) -> float:
    """Diagonal of the bounding box of ``x`` ``[N, D]`` and ``y`` ``[M, D]`` together."""
    both = torch.cat([x, y]).float()  # (N + M, D)
    return float((both.amax(0) - both.amin(0)).norm())
