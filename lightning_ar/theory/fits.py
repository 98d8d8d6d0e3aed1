"""Curve fits that decide whether a measured curve supports a claim of the paper (SPEC 2.2).

- :func:`fit_exponential_decay` fits ``v_i = M * beta**i + m`` (Theorem 2: the conditional score norm decays
  exponentially in the AR step toward a floor) and compares it with a straight line.
- :func:`fit_contraction` summarises an inner Sinkhorn-flow trace: its geometric contraction rate and how often
  it decreases.

Plain NumPy/SciPy; no Lightning, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, special

MIN_POINTS = 4
MIN_R2 = 0.8
BETA_BOUNDS = (1e-6, 1.5)
NAN = float("nan")


@dataclass
class DecayFit:
    """Least-squares fit of ``v_i = M * beta**i + m`` and of the line ``a + b*i`` for comparison.

    Attributes:
        M: Amplitude (``> 0`` for a decay from above toward the floor).
        beta: Rate; ``< 1`` decays, ``>= 1`` does not (the fit allows up to 1.5 so a non-decay shows as such).
        floor: Asymptote ``m``.
        r2: Coefficient of determination of the exponential model.
        beta_ci: 95% confidence interval of ``beta`` from the Gauss-Newton covariance (the one
            ``scipy.optimize.curve_fit`` reports) with a Student t quantile (``n - 3`` dof).
        rmse: Root-mean-square residual of the exponential model.
        linear_rmse: Root-mean-square residual of the line.
        linear_r2: R^2 of the line.
        exponential_better: The exponential model has the lower AIC (``n log(RSS/n) + 2k``, ``k`` = 3 vs 2).
        holds: The data support a decay toward a floor: ``0 < beta < 1``, ``M > 0``, ``r2 >= 0.8`` and
            ``exponential_better``.
        num_points: Points used.
    """

    M: float = NAN
    beta: float = NAN
    floor: float = NAN
    r2: float = NAN
    beta_ci: tuple[float, float] = (NAN, NAN)
    rmse: float = NAN
    linear_rmse: float = NAN
    linear_r2: float = NAN
    exponential_better: bool = False
    holds: bool = False
    num_points: int = 0

    def to_dict(self) -> dict[str, float | bool | int | list[float]]:
        """Plain-Python dict (``beta_ci`` as a list), e.g. for JSON."""
        out = asdict(self)
        out["beta_ci"] = [float(v) for v in self.beta_ci]
        return out


def _model(x: np.ndarray, amplitude: float, beta: float, floor: float) -> np.ndarray:
    return amplitude * np.power(beta, x) + floor


def _r2(y: np.ndarray, residuals: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float((residuals**2).sum()) / total if total > 0 else NAN


def _aic(rss: float, n: int, k: int, rss_floor: float) -> float:
    return n * math.log(max(rss, rss_floor) / n) + 2 * k


def _profile(x: np.ndarray, y: np.ndarray, beta: float) -> tuple[float, np.ndarray]:
    """Residual sum of squares and ``(M, m)`` of the best fit at a fixed ``beta`` (linear least squares)."""
    basis = np.stack([np.power(beta, x), np.ones_like(x)], axis=1)  # (n, 2)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    return float(((y - basis @ coef) ** 2).sum()), coef


def _best_beta(x: np.ndarray, y: np.ndarray) -> float:
    """Global least-squares rate: profile ``(M, m)`` out, scan ``beta`` on a grid, refine by bounded Brent."""
    grid = np.concatenate([np.geomspace(BETA_BOUNDS[0], 0.01, 9, endpoint=False), np.linspace(0.01, 1.5, 150)])
    grid = grid[np.abs(grid - 1.0) > 1e-9]  # beta = 1 makes M and m collinear
    rss = np.array([_profile(x, y, b)[0] for b in grid])
    j = int(np.argmin(rss))
    low, high = grid[max(j - 1, 0)], grid[min(j + 1, grid.size - 1)]
    found = optimize.minimize_scalar(lambda b: _profile(x, y, b)[0], bounds=(low, high), method="bounded",
                                     options={"xatol": 1e-10})
    return float(found.x) if found.fun <= rss[j] else float(grid[j])


def _covariance(x: np.ndarray, amp: float, beta: float, rss: float) -> np.ndarray:
    """Gauss-Newton covariance of ``(M, beta, m)``, as ``scipy.optimize.curve_fit`` reports it."""
    jac = np.stack([np.power(beta, x), amp * x * np.power(beta, x - 1.0), np.ones_like(x)], axis=1)  # (n, 3)
    return rss / (x.size - 3) * np.linalg.pinv(jac.T @ jac)


def _linear(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residuals of the least-squares line."""
    slope, intercept = np.polyfit(x, y, 1)
    return y - (intercept + slope * x)


def fit_exponential_decay(steps: Sequence[float], values: Sequence[float]) -> DecayFit:
    """Fit ``v_i = M * beta**i + m`` by least squares and compare it with a line.

    ``(M, m)`` are solved in closed form for each ``beta`` (variable projection); ``beta`` is the global minimiser
    of the residual over ``(1e-6, 1.5)`` (grid scan, then bounded Brent), so the fit does not depend on a start.

    Non-finite points are dropped. Fewer than 4 points, a constant curve or a failed fit give a :class:`DecayFit`
    with NaNs and ``holds=False`` (never an exception).

    Args:
        steps: ``[n]`` abscissae ``i`` (AR steps).
        values: ``[n]`` measured values ``v_i``.

    Returns:
        The fit, in the units of ``values``.
    """
    x, y = np.asarray(steps, dtype=float).ravel(), np.asarray(values, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"steps and values must have the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < MIN_POINTS or np.ptp(x) == 0:
        return DecayFit(num_points=n)
    scale, offset = float(np.ptp(y)), float(y.mean())
    if scale <= 1e-12 * max(abs(offset), 1e-300):
        return DecayFit(M=0.0, floor=offset, num_points=n)
    ys = (y - offset) / scale
    try:
        beta = _best_beta(x, ys)
        rss, (amp, floor) = _profile(x, ys, beta)
        cov = _covariance(x, amp, beta, rss)
    except (np.linalg.LinAlgError, ValueError):
        return DecayFit(num_points=n)
    return _summarise(x, ys, (amp, beta, floor), cov, scale, offset)


def _summarise(x: np.ndarray, ys: np.ndarray, params: tuple[float, float, float], cov: np.ndarray, scale: float,
               offset: float) -> DecayFit:
    """Turn a fit on scaled values into a :class:`DecayFit` in the original units."""
    amp, beta, floor = params
    n = x.size
    res_exp, res_lin = ys - _model(x, amp, beta, floor), _linear(x, ys)
    rss_exp, rss_lin = float((res_exp**2).sum()), float((res_lin**2).sum())
    rss_floor = 1e-20 * n  # relative to unit range: treat fits this exact as equally exact
    better = _aic(rss_exp, n, 3, rss_floor) < _aic(rss_lin, n, 2, rss_floor)
    sd = math.sqrt(cov[1, 1]) if np.isfinite(cov[1, 1]) and cov[1, 1] >= 0 else NAN
    half = float(special.stdtrit(n - 3, 0.975)) * sd
    r2 = _r2(ys, res_exp)
    holds = bool(0 < beta < 1 and amp > 0 and r2 >= MIN_R2 and better)
    return DecayFit(
        M=float(amp * scale), beta=float(beta), floor=float(floor * scale + offset), r2=r2,
        beta_ci=(float(beta - half), float(beta + half)), rmse=scale * math.sqrt(rss_exp / n),
        linear_rmse=scale * math.sqrt(rss_lin / n), linear_r2=_r2(ys, res_lin), exponential_better=bool(better),
        holds=holds, num_points=n,
    )


def fit_contraction(values: Sequence[float], atol: float = 1e-12) -> dict[str, float]:
    """Contraction summary of one inner-flow trace ``[K+1]`` (divergence to the flow's target at each step).

    ``rho`` is the **median of successive ratios** ``v[j+1] / v[j]`` over steps with ``v[j] > atol``: the claim
    ``S_k <= rho^k S_0`` measured toward zero. Since the Sinkhorn divergence (``p=2``) scales like ``W2^2 / 2``, a
    W2 contraction at rate ``r`` shows here as ``rho ~ r^2``. ``rho_bound = max_k (v[k]/v[0])^(1/k)`` is the smallest
    rate for which ``v[k] <= rho^k v[0]`` holds at every measured ``k`` (the claim's own form). When at least
    four points are available, ``rho_floor`` and ``floor`` are the ``beta`` and ``m`` of
    :func:`fit_exponential_decay` (contraction toward a fitted floor, e.g. the finite-sample divergence).

    Args:
        values: ``[K+1]`` divergences along the flow.
        atol: Values at or below this count as zero (no ratio taken from them).

    Returns:
        ``rho``, ``rho_bound``, ``rho_floor``, ``floor``, ``fraction_monotone`` (fraction of steps with
        ``v[j+1] <= v[j] * (1 + 1e-6) + 1e-12``) and ``num_steps`` (``K``). An all-zero trace gives ``rho`` NaN and
        ``fraction_monotone`` 1.0; a trace with fewer than two points gives NaNs.
    """
    v = np.asarray(values, dtype=float).ravel()
    k = v.size - 1
    if k < 1 or not np.isfinite(v).all():
        return {"rho": NAN, "rho_bound": NAN, "rho_floor": NAN, "floor": NAN, "fraction_monotone": NAN,
                "num_steps": float(max(k, 0))}
    monotone = float(np.mean(v[1:] <= v[:-1] * (1 + 1e-6) + 1e-12))
    positive = v[:-1] > atol
    rho = float(np.median(v[1:][positive] / v[:-1][positive])) if positive.any() else NAN
    ratios = np.clip(v[1:] / v[0], 0.0, None) if v[0] > atol else np.full(k, NAN)
    bound = float(np.max(ratios ** (1.0 / np.arange(1, k + 1))))
    fit = fit_exponential_decay(np.arange(k + 1), v) if positive.any() else DecayFit()
    return {"rho": rho, "rho_bound": bound, "rho_floor": fit.beta, "floor": fit.floor,
            "fraction_monotone": monotone, "num_steps": float(k)}


def decay_claim(per_sample: np.ndarray, reps: int = 1000, seed: int = 0) -> dict:
    """Bootstrap verdict on "``v_i`` decays exponentially toward a floor" from per-sample values ``[K, B]``.

    Samples (generated images, which contribute to every AR step: the comparison is paired) are resampled with
    replacement; each replicate's curve ``mean_b v_i`` is refitted. Pre-registered criterion: **holds** when the
    point fit holds (:attr:`DecayFit.holds`), the CI of ``v_last - v_first`` lies below zero and the CI of ``beta``
    lies in ``(0, 1)``; **does not hold** when the CI of ``v_last - v_first`` lies above zero (the curve rises) or
    the CI of ``beta`` lies at or above 1; **not resolved** otherwise.

    Returns:
        ``verdict``, ``fit`` (:meth:`DecayFit.to_dict` of the mean curve), ``change`` (``v_last - v_first``),
        ``change_ci`` (basic bootstrap interval), ``beta_ci`` (percentile interval: ``beta`` is bounded) and
        ``num_samples``.
    """
    from lightning_ar.theory.stats import FAILS, HOLDS, UNMEASURABLE, UNRESOLVED, basic_ci, percentile_ci

    v = np.asarray(per_sample, dtype=float)
    k, b = v.shape
    steps = np.arange(k)
    fit = fit_exponential_decay(steps, v.mean(1))
    if k < MIN_POINTS or b < 2 or not np.isfinite(v).all():
        return {"verdict": UNMEASURABLE, "fit": fit.to_dict(), "change": NAN, "change_ci": [NAN, NAN],
                "beta_ci": [NAN, NAN], "num_samples": int(b)}
    rng = np.random.default_rng(seed)
    curves = [v[:, rng.integers(0, b, b)].mean(1) for _ in range(reps)]
    change_ci = basic_ci(float(v.mean(1)[-1] - v.mean(1)[0]), [c[-1] - c[0] for c in curves])
    beta_ci = percentile_ci([fit_exponential_decay(steps, c).beta for c in curves])
    if fit.holds and change_ci[1] < 0 and 0 < beta_ci[0] and beta_ci[1] < 1:
        state = HOLDS
    elif change_ci[0] > 0 or beta_ci[0] >= 1:
        state = FAILS
    else:
        state = UNRESOLVED
    return {"verdict": state, "fit": fit.to_dict(), "change": float(v.mean(1)[-1] - v.mean(1)[0]),
            "change_ci": list(change_ci), "beta_ci": list(beta_ci), "num_samples": int(b)}
