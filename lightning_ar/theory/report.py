"""``theory_report.md``: the measured numbers of the theory monitors and whether each claim of the paper holds.

Each monitor writes its own section file (``<dir>/theory/score_norm.md``, ``<dir>/theory/sinkhorn.md``);
:func:`write_theory_report` (re)writes the sections it is given and concatenates every section present into
``<dir>/theory_report.md``, so a run with one monitor gets one section. All writes are atomic.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lightning_ar.io import atomic_write_text
from lightning_ar.theory.fits import MIN_POINTS, MIN_R2

REPORT_NAME = "theory_report.md"
SECTIONS = ("score_norm", "sinkhorn")
HEADER = (
    "# Theory checks\n\nMeasured on this run's model, as defined in SPEC 2.2-2.3. The refinement is this project's "
    "concrete reading of Zhou, Li & Shen (ICLR 2026), whose Algorithm 1 is not public. A claim \"holds\" only when "
    "the measured curve supports it by the stated criterion; small or untrained models often do not.\n"
)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**holds**" if ok else "**does not hold**")


def _link(plot: str | None, report_dir: Path) -> str:
    if not plot:
        return ""
    return f"\n![{Path(plot).stem}]({Path(os.path.relpath(plot, report_dir)).as_posix()})\n"


def _decay_reasons(fit: dict[str, Any]) -> str:
    """Why a decay fit does not support Theorem 2 (empty when it does)."""
    if fit["num_points"] < MIN_POINTS or not math.isfinite(fit["beta"]):
        return f"no fit (needs >= {MIN_POINTS} AR steps and a non-constant curve)"
    checks = [(0 < fit["beta"] < 1, "beta >= 1 (no decay)"), (fit["M"] > 0, "M <= 0 (the curve rises to its floor)"),
              (fit["r2"] >= MIN_R2, f"R^2 < {MIN_R2}"), (fit["exponential_better"], "a line fits as well (AIC)")]
    return "; ".join(msg for ok, msg in checks if not ok)


def _score_table(norms: dict[str, Any]) -> list[str]:
    guided, ts = norms["guidance_mean"] is not None, norms["timesteps"]
    head = "| AR step | s_i (mean over t) | " + " | ".join(f"s_i(t={t})" for t in ts) + (" | g_i |" if guided else " |")
    rows = [head, "|" + "---|" * (len(ts) + 2 + guided)]
    for i, (mean, per_t) in enumerate(zip(norms["score_mean"], norms["score"])):
        cells = [str(i), _fmt(mean), *map(_fmt, per_t)] + ([_fmt(norms["guidance_mean"][i])] if guided else [])
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def score_section(last: dict[str, Any], report_dir: Path) -> str:
    """Markdown section of :class:`~lightning_ar.callbacks.theory.ConditionalScoreNormMonitor` results."""
    norms, fit = last["norms"], last["fit"]
    guided = norms["guidance_mean"] is not None
    rows = _score_table(norms)
    reasons = _decay_reasons(fit)
    lines = [
        "## Conditional score norm across AR steps (Theorem 2)\n",
        f"Stage `{last['stage']}`, global step {last['global_step']}, {last['num_samples']} samples, cfg "
        f"{_fmt(last['cfg'])}. `s_i = E||eps_theta(x_t, t, c_i)|| / sigma_t` over the tokens of AR step i, "
        f"x_t from the sampled tokens at fixed t (noise seeded); `g_i` the same for `eps(c_i) - eps(c_null,i)`.\n",
        *rows, "",
        f"Fit `s_i = M beta^i + m`: M = {_fmt(fit['M'])}, beta = {_fmt(fit['beta'])} (95% CI "
        f"[{_fmt(fit['beta_ci'][0])}, {_fmt(fit['beta_ci'][1])}]), m = {_fmt(fit['floor'])}, R^2 = {_fmt(fit['r2'])}, "
        f"RMSE = {_fmt(fit['rmse'])}. Line: R^2 = {_fmt(fit['linear_r2'])}, RMSE = {_fmt(fit['linear_rmse'])}. "
        f"Exponential better than linear (AIC): {'yes' if fit['exponential_better'] else 'no'}.\n",
        f"- Claim \"the conditional score norm decays exponentially toward a floor (beta in (0, 1))\": "
        f"{_verdict(fit['holds'])}" + (f" ({reasons})." if reasons else "."),
    ]
    if guided:
        g = norms["guidance_mean"]
        lines.append(f"- Guidance norm g_i: first step {_fmt(g[0])}, last step {_fmt(g[-1])}.")
    return "\n".join(lines) + "\n" + _link(last.get("plot"), report_dir)


def _mode_claims(mode: str, s: dict[str, float]) -> list[str]:
    """Verdicts of one mode: flow claims only with flow traces, the held-out claim only for a refining mode."""
    lines = []
    if s["num_flow_traces"] > 0:
        mono = s["fraction_monotone"] >= 1.0 if math.isfinite(s["fraction_monotone"]) else None
        rho = s["rho_bound"] < 1.0 if math.isfinite(s["rho_bound"]) else None
        lines += [
            f"- `{mode}`: the Sinkhorn divergence to the flow's target decreases monotonically along the flow: "
            f"{_verdict(mono)} (fraction of monotone flow steps {_fmt(s['fraction_monotone'])}).",
            f"- `{mode}`: geometric contraction `S_j <= rho^j S_0` with rho < 1 on every AR step's flow: "
            f"{_verdict(rho)} (smallest such rho {_fmt(s['rho_bound'])}; median successive ratio {_fmt(s['rho'])}, "
            "which a plateau pushes toward 1; for the divergence, about the square of a W2 rate).",
        ]
    if mode != "none":
        lower = s["reduction"] > 0 if math.isfinite(s["reduction"]) else None
        lines.append(f"- `{mode}`: refinement lowers the divergence to held-out ideal conditions: {_verdict(lower)} "
                     f"(reduction {_fmt(s['reduction'])}).")
    return lines


def _sinkhorn_row(mode: str, k: int, cur: dict[str, Any]) -> str:
    tr, con = cur["flow_traces"][k], cur["contraction"][k] or {}
    cells = [mode, str(k), _fmt(cur["before"][k]), _fmt(cur["after"][k]), _fmt(tr[0] if tr else None),
             _fmt(tr[-1] if tr else None), *(_fmt(con.get(key)) for key in ("rho", "rho_bound", "fraction_monotone"))]
    return "| " + " | ".join(cells) + " |"


def sinkhorn_section(last: dict[str, Any], report_dir: Path) -> str:
    """Markdown section of :class:`~lightning_ar.callbacks.theory.SinkhornDivergenceMonitor` results."""
    lines = [
        "## Sinkhorn divergence of the conditions (SPEC 2.3)\n",
        f"Stage `{last['stage']}`, global step {last['global_step']}, {last['num_samples']} samples per mode. "
        "Before/after: divergence of the produced conditions to held-out ideal conditions (teacher forcing on the "
        "validation split). The inner flow is measured against its own target samples, so its decrease alone "
        "proves nothing about sample quality.\n",
        "| mode | AR step | before | after | flow start | flow end | rho (median ratio) | rho bound | monotone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_sinkhorn_row(mode, k, cur) for mode, cur in last["modes"].items() for k in range(len(cur["before"]))]
    lines.append("")
    for mode, cur in last["modes"].items():
        s = cur["summary"]
        lines.append(f"`{mode}`: before mean {_fmt(s['before_mean'])}, after mean {_fmt(s['after_mean'])}, "
                     f"reduction 1 - sum(after)/sum(before) = {_fmt(s['reduction'])}; "
                     f"{int(s['num_flow_traces'])} non-trivial flow traces.\n")
    for mode, cur in last["modes"].items():
        lines.extend(_mode_claims(mode, cur["summary"]))
    return "\n".join(lines) + "\n" + _link(last.get("plot"), report_dir)


def write_theory_report(
    path: str | Path, score: dict[str, Any] | None = None, sinkhorn: dict[str, Any] | None = None
) -> Path:
    """Write the given sections and assemble ``theory_report.md`` from every section present.

    Args:
        path: Output directory (the trainer's log dir), or the report's ``.md`` path.
        score: ``ConditionalScoreNormMonitor.last`` (rewrites ``theory/score_norm.md``), or ``None``.
        sinkhorn: ``SinkhornDivergenceMonitor.last`` (rewrites ``theory/sinkhorn.md``), or ``None``.

    Returns:
        The report's path.
    """
    path = Path(path)
    report = path if path.suffix == ".md" else path / REPORT_NAME
    section_dir = report.parent / "theory"
    for name, last, render in (("score_norm", score, score_section), ("sinkhorn", sinkhorn, sinkhorn_section)):
        if last is not None:
            atomic_write_text(section_dir / f"{name}.md", render(last, report.parent))
    parts = [(section_dir / f"{name}.md") for name in SECTIONS]
    body = "\n".join(p.read_text() for p in parts if p.is_file())
    atomic_write_text(report, HEADER + "\n" + (body or "No theory monitor has written a section yet.\n"))
    return report
