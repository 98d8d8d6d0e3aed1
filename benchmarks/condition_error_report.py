"""Markdown tables and the figure of the condition-error study (from the summary of ``condition_error_summary``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _fmt(ci: dict, digits: int = 3) -> str:
    return f"{ci['value']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


def _late_mean(rows: list[dict], late: list[int]) -> float:
    return float(np.mean([rows[k]["value"] for k in late]))


def format_markdown(summary: dict) -> str:
    """Tables: per regime the late-step means, the sequence excess, the criteria, the controls."""
    tier = summary["settings"]["tier"]
    lines = ["# Ground truth for condition errors on gmm (issue 14)", "",
             f"Tier `{tier.get('seeds')}` seeds, {tier['num_samples']} samples per run "
             f"(oracle on the first {tier['oracle_samples']}), cfg 1 unless stated. 95% paired bootstrap intervals "
             f"over seeds and samples. KL excess: whitened-residual Gaussian KL minus that of exact draws at the same "
             f"contexts (its finite-sample floor). Late: AR steps k >= K/2.", "",
             "| regime | sequence excess NLL GEN (nats/dim) | perfect per-token sampler | late KL excess GEN | TF | "
             "ORACLE | late per-token excess NLL GEN | TF |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["regimes"].items():
        late, table, seq = entry["late_steps"], entry["per_step"], entry["sequence_excess"]
        cells = [_fmt(seq["gen"]), _fmt(seq["exact_gen"]) if "exact_gen" in seq else "-"]
        for arm in ("gen", "tf", "oracle"):
            cells.append(f"{_late_mean(table[arm]['kl_excess'], late):.3f}" if arm in table else "-")
        for arm in ("gen", "tf"):
            cells.append(f"{_late_mean(table[arm]['excess_token'], late):.3f}" if arm in table else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Pre-registered criteria", "", "| criterion | claim | difference [95% CI] | verdict |",
              "|---|---|---|---|"]
    for c in summary["criteria"]:
        value = _fmt(c) if "value" in c else "-"
        lines.append(f"| {c['name']} | {c['claim']} | {value} | {c['verdict']} |")
    if "controls" in summary:
        ctl = summary["controls"]
        lines += ["", f"## Controls ({ctl['regime']} seed {ctl['seed']}, injected at steps >= {ctl.get('start_step')})",
                  "", "| control | late-step change of KL | of per-token excess NLL | of dispersion |",
                  "|---|---|---|---|"]
        late = list(range(ctl.get("start_step", 0), len(next(iter(ctl["delta"].values()))["kl"])))
        for name, rows in ctl["delta"].items():
            lines.append(f"| {name} | " + " | ".join(f"{_late_mean(rows[m], late):+.3f}"
                                                    for m in ("kl", "excess_token", "dispersion")) + " |")
    cost = summary.get("cost", {})
    lines += ["", f"CPU time of all runs: {cost.get('cpu_seconds_all_runs', 0) / 60:.0f} min "
              f"(about {cost.get('wall_estimate_2_cores_minutes', 0):.0f} min on 2 otherwise idle cores)."]
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: Path) -> None:
    """Per-step GEN / TF / ORACLE KL excess (each MAR regime), the controls and Theorem 2 against truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r, e in summary["regimes"].items() if "tf" in e["per_step"]]
    fig, axes = plt.subplots(2, max(len(regimes), 3), figsize=(3.2 * max(len(regimes), 3), 6.2), squeeze=False)
    for ax, name in zip(axes[0], regimes):
        table = summary["regimes"][name]["per_step"]
        for arm, color in (("gen", "C3"), ("tf", "C0"), ("oracle", "C2")):
            if arm in table:
                rows = table[arm]["kl_excess"]
                ks = np.arange(len(rows))
                ax.errorbar(ks, [r["value"] for r in rows], yerr=[[r["value"] - r["lo"] for r in rows],
                                                                    [r["hi"] - r["value"] for r in rows]],
                            color=color, label=arm.upper(), marker="o", ms=3, capsize=2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("AR step k")
    axes[0][0].set_ylabel("KL excess (nats)")
    axes[0][0].legend(fontsize=7)
    _plot_controls(axes[1][0], summary)
    for ax, name in zip(axes[1][1:], [r for r in ("R0", "R2") if "scores" in summary["regimes"].get(r, {})]):
        _plot_scores(ax, summary["regimes"][name]["scores"], name)
    for ax in axes.flat:
        if not ax.has_data():
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_controls(ax, summary: dict) -> None:
    if "controls" not in summary:
        return
    for i, (name, rows) in enumerate(summary["controls"]["delta"].items()):
        ks = np.arange(len(rows["kl"]))
        ax.plot(ks + 0.05 * i, [r["value"] for r in rows["kl"]], marker="o", ms=3, label=name)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"controls on {summary['controls']['regime']}: change of KL", fontsize=9)
    ax.set_xlabel("AR step k")
    ax.legend(fontsize=7)


def _plot_scores(ax, scores: dict, name: str) -> None:
    for key, color, style in (("model_score", "C3", "-"), ("true_score", "C3", "--"),
                              ("model_guidance", "C0", "-"), ("true_guidance", "C0", "--")):
        ax.plot([row[0]["value"] for row in scores[key]], color=color, ls=style, marker="o", ms=3, label=key)
    ax.set_title(f"{name}: Theorem 2 at t={scores['timesteps'][0]}", fontsize=9)
    ax.set_xlabel("AR step k")
    ax.legend(fontsize=7)
