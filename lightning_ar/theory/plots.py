"""Figures of the theory monitors, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_ar.io import atomic_output
from lightning_ar.theory.fits import DecayFit
from lightning_ar.theory.measures import ScoreNorms, SinkhornCurves


def plot_score_norms(norms: ScoreNorms, fit: DecayFit) -> Figure:
    """``s_i`` per timestep and averaged, the fitted ``M beta^i + m``, and ``g_i`` on a second panel."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_s, ax_g = fig.subplots(1, 2)
    steps = np.arange(norms.score.shape[0])
    for j, t in enumerate(norms.timesteps):
        ax_s.plot(steps, norms.score[:, j], "o-", alpha=0.35, lw=1, label=f"t={t}")
    ax_s.plot(steps, norms.score_mean, "ko-", lw=2, label="mean over t")
    if np.isfinite(fit.beta):
        fine = np.linspace(0, steps[-1], 200)
        ax_s.plot(fine, fit.M * fit.beta**fine + fit.floor, "r--",
                  label=f"fit beta={fit.beta:.3f}, R2={fit.r2:.2f}")
    ax_s.set(xlabel="AR step i", ylabel="E||eps|| / sigma_t", title="conditional score norm s_i")
    ax_s.legend(fontsize=7)
    if norms.guidance is not None:
        ax_g.plot(steps, norms.guidance, "o-", alpha=0.35, lw=1)
        ax_g.plot(steps, norms.guidance_mean, "ko-", lw=2)
    else:
        ax_g.text(0.5, 0.5, "no guidance (cfg = 1)", ha="center", va="center", transform=ax_g.transAxes)
    ax_g.set(xlabel="AR step i", ylabel="E||eps_c - eps_null|| / sigma_t", title="guidance norm g_i")
    return fig


def plot_sinkhorn(curves: dict[str, SinkhornCurves]) -> Figure:
    """Divergence to held-out ideal conditions before/after refinement per AR step, and the inner-flow traces."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_d, ax_f = fig.subplots(1, 2)
    for j, (mode, cur) in enumerate(curves.items()):
        steps, color = np.arange(cur.before.size), f"C{j}"
        ax_d.plot(steps, cur.before, "s--", color=color, alpha=0.6, label=f"before ({mode})")
        ax_d.plot(steps, cur.after, "o-", color=color, label=f"after ({mode})")
    ax_d.set(xlabel="AR step k", ylabel="Sinkhorn divergence", title="to held-out ideal conditions")
    ax_d.legend(fontsize=7)
    _plot_inner_flows(ax_f, curves, "inner flow")
    return fig


def plot_conditions(results: dict[str, dict], curves: dict[str, SinkhornCurves]) -> Figure:
    """Per AR step: pooled divergence to held-out ideal conditions, the dispersion ratio (with its SE and the
    [0.9, 1.1] band), and the inner-flow traces toward the flow's own target."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax_d, ax_r, ax_f = fig.subplots(1, 3)
    for j, (mode, stats) in enumerate(results.items()):
        steps = [s for s in stats["steps"] if not s["trivial"]]
        ks, color = [s["step"] for s in steps], f"C{j}"
        ax_d.plot(ks, [s["divergence_before"] for s in steps], "s--", color=color, alpha=0.6, label=f"raw ({mode})")
        ax_d.plot(ks, [s["divergence_after"] for s in steps], "o-", color=color, label=f"refined ({mode})")
        for key, style in (("ratio_before", "s--"), ("ratio_after", "o-")):
            r = np.array([[s[key]["ratio"], s[key]["se"]] for s in steps], dtype=float).reshape(-1, 2)
            ax_r.errorbar(ks, r[:, 0], yerr=r[:, 1], fmt=style, color=color, ms=4, capsize=2,
                          alpha=0.6 if key == "ratio_before" else 1.0, label=f"{key[6:]} ({mode})")
    ax_d.set(xlabel="AR step k", ylabel="Sinkhorn divergence (pooled)", title="to held-out ideal conditions")
    ax_d.legend(fontsize=7)
    ax_r.axhspan(0.9, 1.1, color="0.85", zorder=0)
    ax_r.axhline(1.0, color="0.5", lw=0.8)
    ax_r.set(xlabel="AR step k", ylabel="dispersion produced / ideal", title="within-group dispersion ratio")
    ax_r.legend(fontsize=7)
    _plot_inner_flows(ax_f, curves, "inner flow (own target)")
    return fig


def _plot_inner_flows(ax: Axes, curves: dict[str, SinkhornCurves], title: str) -> None:
    """The inner-flow divergence traces of every mode and AR step on ``ax`` (symlog scale)."""
    for mode, cur in curves.items():
        for k, tr in enumerate(cur.flow_traces):
            if tr is not None:
                ax.plot(np.arange(tr.size), tr, "o-", ms=3, label=f"{mode} step {k}")
    ax.set(xlabel="flow step j", ylabel="divergence to flow target", title=title, yscale="symlog")
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG atomically; return the path."""
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def figure_to_array(fig: Figure) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB rendering of ``fig`` (e.g. for ``SummaryWriter.add_image(..., dataformats="HWC")``)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
