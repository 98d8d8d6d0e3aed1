"""Measured quantities of SPEC 2.2 from a :class:`GenerationTrace`: score/guidance norms and Sinkhorn curves.

No Lightning here: the callbacks in :mod:`lightning_ar.callbacks.theory` generate, call these and log the results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.modes import eval_mode
from lightning_ar.nn.trace import GenerationTrace, StepRecord
from lightning_ar.theory.fits import fit_contraction

TRIVIAL_DIVERGENCE = 1e-6  # flow traces starting at or below this have nothing to contract (e.g. AR step 0)


@dataclass
class ScoreNorms:
    """Conditional score and guidance norms per AR step and timestep.

    Attributes:
        timesteps: ``[T]`` diffusion timesteps ``t`` (training scale).
        score: ``[K, T]`` ``s_i(t) = mean ||eps_theta(x_t, t, c_i)|| / sigma_t`` over the tokens of step ``i``.
        guidance: ``[K, T]`` ``g_i(t) = mean ||eps_theta(x_t, t, c_i) - eps_theta(x_t, t, c_null,i)|| / sigma_t``,
            or ``None`` when the trace has no null conditions (no guidance).
        score_per_sample: ``[K, T, B]`` the same per generated sample (mean over its tokens of step ``i``), for
            bootstrap CIs over samples (``score`` is its mean over ``B``).
        guidance_per_sample: ``[K, T, B]`` or ``None``.
    """

    timesteps: list[int]
    score: np.ndarray
    guidance: np.ndarray | None
    score_per_sample: np.ndarray | None = None
    guidance_per_sample: np.ndarray | None = None

    @property
    def score_mean(self) -> np.ndarray:
        """``[K]`` ``s_i`` averaged over the timesteps."""
        return self.score.mean(axis=1)

    @property
    def guidance_mean(self) -> np.ndarray | None:
        """``[K]`` ``g_i`` averaged over the timesteps (``None`` without guidance)."""
        return None if self.guidance is None else self.guidance.mean(axis=1)

    def to_dict(self) -> dict:
        """Plain lists, for notebooks, JSON and reports (the per-sample arrays are left out)."""
        guided = self.guidance is not None
        return {"timesteps": list(self.timesteps), "score": self.score.tolist(), "score_mean": self.score_mean.tolist(),
                "guidance": self.guidance.tolist() if guided else None,
                "guidance_mean": self.guidance_mean.tolist() if guided else None}


def _step_norms(head: DiffusionLoss, rec: StepRecord, t: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample ``(s_i(t), g_i(t))`` ``[B]`` of one step record (``g`` NaN without null conditions)."""
    device = head.alphas_cumprod.device
    b, n = rec.positions.shape
    x0 = rec.tokens.reshape(-1, head.token_dim).to(device, torch.float32)  # (B*n, Dt)
    z = rec.conditions.reshape(x0.shape[0], -1).to(device, torch.float32)  # (B*n, D)
    null = rec.null_conditions
    if null is not None:
        z = torch.cat([z, null.reshape(x0.shape[0], -1).to(device, torch.float32)])  # (2Bn, D)
    noise = torch.randn(x0.shape, device=device, generator=generator)  # (B*n, Dt)
    ab = head.alphas_cumprod[t]
    sigma = float((1.0 - ab).sqrt())
    x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise  # (B*n, Dt)
    x_in = x_t.repeat(z.shape[0] // x0.shape[0], 1)  # (Bn or 2Bn, Dt)
    t_in = torch.full((x_in.shape[0],), t, device=device, dtype=torch.long)
    eps = head.net(x_in, t_in, z)[:, : head.token_dim].float()  # (Bn or 2Bn, Dt)
    score = eps[: x0.shape[0]].norm(dim=-1).reshape(b, n).mean(1) / sigma  # (B,)
    if null is None:
        return score, torch.full_like(score, math.nan)
    cond, uncond = eps.chunk(2)
    return score, (cond - uncond).norm(dim=-1).reshape(b, n).mean(1) / sigma


@torch.no_grad()
def score_norms(
    head: DiffusionLoss, trace: GenerationTrace, timesteps: Sequence[int], generator: torch.Generator
) -> ScoreNorms:
    """Conditional score norms ``s_i(t)`` (and guidance norms ``g_i(t)``) of every AR step of ``trace``.

    For each step ``i`` and timestep ``t`` the step's sampled tokens ``x0`` ``[N, Dt]`` are noised,
    ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``, and the head predicts the noise from the step's conditions;
    with an epsilon-predicting head ``grad log p_t(x_t | c) = -eps_theta / sigma_t``, ``sigma_t = sqrt(1 - ab_t)``.
    These are the *model's* score norms at its own samples; the true score is known only on ``gmm``.

    Args:
        head: The diffusion head that sampled the trace (its ``net`` and ``alphas_cumprod`` are used).
        trace: A filled trace (``tokens``, ``conditions`` and, with guidance, ``null_conditions`` per step).
        timesteps: ``[T]`` timesteps in ``[0, num_train_timesteps)``.
        generator: RNG on the head's device for the noise.

    Returns:
        :class:`ScoreNorms` with ``[K, T]`` arrays and ``[K, T, B]`` per-sample arrays.
    """
    if not trace.steps:
        raise ValueError("score_norms needs a trace filled by generate(..., trace=trace)")
    with eval_mode(head):
        values = [[torch.stack(_step_norms(head, rec, int(t), generator)) for t in timesteps] for rec in trace.steps]
    arr = torch.stack([torch.stack(row) for row in values]).double().cpu().numpy()  # (K, T, 2, B)
    guided = all(rec.null_conditions is not None for rec in trace.steps)
    per_s, per_g = arr[:, :, 0], (arr[:, :, 1] if guided else None)
    return ScoreNorms(list(map(int, timesteps)), per_s.mean(-1), None if per_g is None else per_g.mean(-1),
                      per_s, per_g)


@dataclass
class SinkhornCurves:
    """Divergences of produced conditions to held-out ideal ones per AR step, and the inner-flow traces.

    Attributes:
        before: ``[K]`` divergence before refinement.
        after: ``[K]`` divergence after refinement.
        flow_traces: Per AR step the ``[F+1]`` inner-flow trace, or ``None`` (no flow at that step / mode).
        contraction: Per AR step :func:`fit_contraction` of its flow trace, or ``None``.
    """

    before: np.ndarray
    after: np.ndarray
    flow_traces: list[np.ndarray | None] = field(default_factory=list)
    contraction: list[dict[str, float] | None] = field(default_factory=list)

    def nontrivial(self) -> list[int]:
        """AR steps whose flow trace starts above :data:`TRIVIAL_DIVERGENCE` (something to contract)."""
        return [k for k, tr in enumerate(self.flow_traces) if tr is not None and tr[0] > TRIVIAL_DIVERGENCE]

    def summary(self) -> dict[str, float]:
        """``before_mean``, ``after_mean``, ``reduction`` (``1 - sum(after)/sum(before)``), and over the
        non-trivial flow traces ``fraction_monotone`` (pooled over all their flow steps), ``rho`` (mean of the
        per-trace median ratios), ``rho_bound`` (largest per-trace ``rho_bound``: the smallest rate with
        ``S_j <= rho^j S_0`` on every trace) and ``num_flow_traces`` (NaN flow values when there is none)."""
        total = float(self.before.sum())
        steps = self.nontrivial()
        pooled = np.concatenate([[]] + [self.flow_traces[k][1:] <= self.flow_traces[k][:-1] * (1 + 1e-6) + 1e-12
                                        for k in steps])
        rhos = [self.contraction[k]["rho"] for k in steps if math.isfinite(self.contraction[k]["rho"])]
        bounds = [self.contraction[k]["rho_bound"] for k in steps if math.isfinite(self.contraction[k]["rho_bound"])]
        return {
            "before_mean": float(self.before.mean()), "after_mean": float(self.after.mean()),
            "reduction": 1.0 - float(self.after.sum()) / total if total > 0 else math.nan,
            "fraction_monotone": float(pooled.mean()) if pooled.size else math.nan,
            "rho": float(np.mean(rhos)) if rhos else math.nan, "rho_bound": max(bounds) if bounds else math.nan,
            "num_flow_traces": float(len(steps)),
        }

    def to_dict(self) -> dict:
        """Plain lists, for notebooks, JSON and reports."""
        return {"before": self.before.tolist(), "after": self.after.tolist(),
                "flow_traces": [None if tr is None else tr.tolist() for tr in self.flow_traces],
                "contraction": list(self.contraction), "summary": self.summary()}


def sinkhorn_curves(trace: GenerationTrace) -> SinkhornCurves:
    """Collect ``divergence_before/after`` and ``flow_trace`` of every step of a trace filled by
    ``OTRefinement.generate`` (missing divergences become NaN)."""

    def value(v: float | None) -> float:
        return math.nan if v is None else float(v)

    flows = [None if rec.flow_trace is None else _numpy(rec.flow_trace) for rec in trace.steps]
    return SinkhornCurves(
        before=np.array([value(rec.divergence_before) for rec in trace.steps]),
        after=np.array([value(rec.divergence_after) for rec in trace.steps]),
        flow_traces=flows,
        contraction=[None if tr is None else fit_contraction(tr) for tr in flows],
    )


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(float).ravel()
