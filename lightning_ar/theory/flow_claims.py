"""The paper's flow claims measured so that they can fail: monotone decrease and geometric contraction of the
divergence to *held-out* ideal conditions along the inner flow, fitted toward a floor.

Toward the flow's own target samples both claims are guaranteed by arithmetic when most conditions are alone in
their (class, position) group (the per-group objective is a quadratic), and a one-step flow offers one comparison.
Here, along a flow of at least :data:`MIN_FLOW_STEPS` steps, the divergence ``S_j`` of the pooled conditions after
flow step ``j`` to held-out ideal conditions is resampled by the half-sample bootstrap over generated images
(:func:`~lightning_ar.theory.stats.half_sample_ci`; paired: the same half at every ``j``). Pre-registered criteria:

- monotone: **holds** when every successive difference ``S_{j+1} - S_j`` has a CI below zero; **does not hold** when
  one has a CI above zero (a resolved rise); **not resolved** otherwise.
- contraction toward a floor: ``S_j = M rho^j + m`` (:func:`~lightning_ar.theory.fits.fit_exponential_decay`);
  **holds** when the point fit holds and the bootstrap CI of ``rho`` lies in ``(0, 1)``; **does not hold** when the CI
  of ``S_K - S_0`` lies above zero or the CI of ``rho`` lies at or above 1; **not resolved** otherwise.

With fewer flow steps both read **not measurable**.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lightning_ar.theory.conditions import SCALING, measurement_blur
from lightning_ar.theory.fits import fit_exponential_decay
from lightning_ar.theory.grouped_sinkhorn import group_clouds, grouped_divergence
from lightning_ar.theory.stats import FAILS, HOLDS, UNMEASURABLE, UNRESOLVED, half_sample_ci

MIN_FLOW_STEPS = 10


def not_measurable(num_steps: int) -> dict:
    """The claims' record for a flow too short to measure them."""
    reason = f"flow_steps = {num_steps} < {MIN_FLOW_STEPS}"
    return {"num_flow_steps": num_steps, "monotone": UNMEASURABLE, "contraction": UNMEASURABLE, "reason": reason}


def path_divergences(path: list[Tensor], groups: Tensor, clusters: Tensor, ref: tuple[Tensor, Tensor, Tensor],
                     seq_len: int, counts: Tensor) -> Tensor:
    """``[K+1, 1+R]`` divergences to held-out ideal conditions of each flow state (column 0: all images; then one
    column per row of image weights ``counts`` ``[R, images]``, e.g. half samples)."""
    ref_z, ref_labels, ref_positions = ref
    ref_groups = ref_labels * seq_len + ref_positions
    blur = measurement_blur(ref_z, ref_groups)
    weights = torch.cat([torch.ones(1, len(groups)), counts[:, clusters]])
    rows = []
    for state in path:
        clouds = group_clouds(state.cpu(), groups, ref_z, ref_groups)
        rows.append(torch.cat([grouped_divergence(clouds, w, blur, SCALING) for w in weights.split(64)]))
    return torch.stack(rows)


def _monotone(values: np.ndarray) -> tuple[str, list[list[float]]]:
    diffs = np.diff(values, axis=0)  # (K, 1+R)
    cis = [list(half_sample_ci(float(d[0]), d[1:])) for d in diffs]
    if all(hi < 0 for _, hi in cis):
        return HOLDS, cis
    if any(lo > 0 for lo, _ in cis):
        return FAILS, cis
    return UNRESOLVED, cis


def _contraction(values: np.ndarray) -> tuple[str, dict, list[float]]:
    steps = np.arange(values.shape[0])
    fit = fit_exponential_decay(steps, values[:, 0])
    betas = [fit_exponential_decay(steps, values[:, r]).beta for r in range(1, values.shape[1])]
    low, high = half_sample_ci(fit.beta, betas)
    beta_ci = (max(low, 0.0), min(high, 1.5)) if math.isfinite(low) else (low, high)  # the fit's range of beta
    total_ci = half_sample_ci(float(values[-1, 0] - values[0, 0]), values[-1, 1:] - values[0, 1:])
    if fit.holds and 0 < beta_ci[0] and beta_ci[1] < 1:
        state = HOLDS
    elif total_ci[0] > 0 or beta_ci[0] >= 1:
        state = FAILS
    else:
        state = UNRESOLVED
    return state, fit.to_dict(), list(beta_ci)


def flow_claims(values: np.ndarray) -> dict:
    """Verdicts of one AR step from ``[K+1, 1+R]`` path divergences (:func:`path_divergences`)."""
    if values.shape[0] - 1 < MIN_FLOW_STEPS:
        return not_measurable(values.shape[0] - 1)
    mono, diff_cis = _monotone(values)
    contraction, fit, beta_ci = _contraction(values)
    return {"num_flow_steps": values.shape[0] - 1, "divergence": values[:, 0].tolist(), "monotone": mono,
            "step_difference_ci": diff_cis, "contraction": contraction, "fit": fit, "rho_ci": beta_ci}


def combine(per_step: dict[int, dict]) -> dict:
    """One verdict per claim over the AR steps: ``holds`` only if it holds at every step, ``does not hold`` if it
    fails at one, ``not measurable`` if unmeasurable everywhere, else ``not resolved``."""
    out = {}
    for claim in ("monotone", "contraction"):
        states = [r[claim] for r in per_step.values()]
        if not states or all(s == UNMEASURABLE for s in states):
            out[claim] = UNMEASURABLE
        elif any(s == FAILS for s in states):
            out[claim] = FAILS
        elif all(s == HOLDS for s in states):
            out[claim] = HOLDS
        else:
            out[claim] = UNRESOLVED
    rhos = [r["fit"]["beta"] for r in per_step.values() if "fit" in r]
    out["rho_mean"] = float(np.nanmean(rhos)) if rhos else math.nan
    return out
