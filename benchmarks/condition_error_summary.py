"""Summary of ``condition_error_study.py``: per-step statistics with paired bootstrap CIs, the pre-registered criteria,
and the JSON / markdown / PNG outputs.

The criteria below were written before the study was run (issue 14: "criteria pre-registered in the code"). Each names
a difference of two bootstrap statistics and the predicted sign; its verdict is "holds" when the 95% interval lies on
that side of zero, "does not hold" when it lies on the other side, "not resolved" when it covers zero. ``late`` means
the AR steps ``k >= K/2``. Primary metric: the floor-corrected whitened-residual KL (``kl_excess``: an arm's KL minus
that of exact draws at the same contexts and count), which is two-sided; the signed per-token excess NLL is reported
beside it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from condition_error_report import format_markdown, plot_summary

from lightning_ar.io import atomic_write_text
from lightning_ar.theory.bootstrap import Replicates, estimate, verdict
from lightning_ar.theory.truth_stats import StackedStep, arm_metric, load_arms, sequence_excess, stack

FLOOR_OF = {"gen": "exact_gen", "tf": "exact_tf", "oracle": "exact_gen", "exact_gen": None, "exact_tf": None}
STEP_METRICS = ("excess_token", "excess_joint", "parallel", "kl", "kl_excess", "dispersion")


@dataclass(frozen=True)
class Criterion:
    """A pre-registered comparison: ``stat(a) - stat(b)`` (``b`` may be ``None``) with a predicted sign."""

    name: str
    claim: str
    a: tuple  # (regime, arm, metric, steps) with steps "late" | "all" | "sequence"
    b: tuple | None
    predicted: str
    baseline: tuple | None = None  # optional second difference subtracted: (a - b) - (baseline_a - baseline_b)


def _gap(regime: str, metric: str = "kl_excess") -> tuple:
    return (regime, "gen", metric, "late"), (regime, "tf", metric, "late")


CRITERIA: tuple[Criterion, ...] = (
    *(Criterion(f"accumulated_{r}", f"{r}: generated context adds error at the late steps (GEN - TF KL excess > 0)",
                *_gap(r), "> 0") for r in ("R0", "R1", "R2", "R3", "R4", "AR")),
    *(Criterion(f"oracle_gap_{r}", f"{r}: a better condition exists at the late steps (GEN - ORACLE KL excess > 0)",
                (r, "gen", "kl_excess", "late"), (r, "oracle", "kl_excess", "late"), "> 0")
      for r in ("R0", "R1", "R2", "R3", "R4", "AR")),
    Criterion("mask_ratio_tf", "mask_ratio_min 0 lowers the late-step error with real context (R1 - R0 TF < 0)",
              ("R1", "tf", "kl_excess", "late"), ("R0", "tf", "kl_excess", "late"), "< 0"),
    Criterion("mask_ratio_gen", "mask_ratio_min 0 lowers the late-step error when generating (R1 - R0 GEN < 0)",
              ("R1", "gen", "kl_excess", "late"), ("R0", "gen", "kl_excess", "late"), "< 0"),
    Criterion("mask_ratio_sequence", "mask_ratio_min 0 lowers the sequence excess NLL (R1 - R0 < 0)",
              ("R1", "gen", "excess_joint", "sequence"), ("R0", "gen", "excess_joint", "sequence"), "< 0"),
    Criterion("undertrained", "25% of the steps leaves more sequence error (R3 - R2 excess NLL > 0)",
              ("R3", "gen", "excess_joint", "sequence"), ("R2", "gen", "excess_joint", "sequence"), "> 0"),
    Criterion("undertrained_gap", "25% of the steps leaves a larger GEN - TF gap (R3 gap - R2 gap > 0)",
              *_gap("R3"), "> 0", baseline=_gap("R2")),
    Criterion("longer_chain", "a longer chain accumulates more (R2 gap - R0 gap > 0)", *_gap("R2"), "> 0",
              baseline=_gap("R0")),
    Criterion("correlation", "stronger correlation makes the context matter more (R4 gap - R2 gap > 0)",
              *_gap("R4"), "> 0", baseline=_gap("R2")),
    Criterion("paper_ar_vs_cdm", "the paper's order: CDM worse than causal AR (sequence excess CDM - AR > 0)",
              ("CDM", "gen", "excess_joint", "sequence"), ("AR", "gen", "excess_joint", "sequence"), "> 0"),
    Criterion("paper_mar_vs_ar", "the paper's order: causal AR worse than MAR (sequence excess AR - R0 > 0)",
              ("AR", "gen", "excess_joint", "sequence"), ("R0", "gen", "excess_joint", "sequence"), "> 0"),
    *(Criterion(f"control_{c}", f"R0: the injected {c} control raises the late-step KL (control - clean > 0)",
                ("controls", c, "kl", "late"), ("controls", "clean", "kl", "late"), "> 0")
      for c in ("bias", "over", "under", "shuffle")),
    *(Criterion(f"thm2_{who}_{what}_{r}", f"{r}: Theorem 2's decay for the {who} {what} norm at t=100 "
                f"(last step - first step < 0)", ("scores", r, f"{who}_{what}", "last"),
                ("scores", r, f"{who}_{what}", "first"), "< 0")
      for r in ("R0", "R2") for who in ("model", "true") for what in ("score", "guidance")),
)


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class RegimeData:
    """Stacked arms of one regime over the seeds (``None`` where a file is missing)."""

    arms: dict[str, list[StackedStep]]
    scores: dict[str, np.ndarray] | None  # key -> [S, K, T, B]
    secondary: dict[str, list[StackedStep]] | None
    infos: list[dict]
    cpu_seconds: float


def _stack_files(paths: list[Path]) -> dict[str, list[StackedStep]] | None:
    if not paths or not all(p.is_file() for p in paths):
        return None
    runs = [load_arms(p) for p in paths]
    return {name: stack([run[name] for run in runs]) for name in runs[0]}


def _cpu(folder: Path) -> float:
    total = 0.0
    for marker in folder.glob("*.done"):
        try:
            total += float(json.loads(marker.read_text())["cpu_seconds"])
        except (ValueError, KeyError):
            pass
    return total


def load_regime(out: Path, regime: str, seeds: tuple[int, ...]) -> RegimeData | None:
    dirs = [out / regime / f"seed{s}" for s in seeds]
    arms = _stack_files([d / "main.npz" for d in dirs])
    if arms is None:
        return None
    score_files = [d / "main_scores.npz" for d in dirs]
    scores = None
    if all(p.is_file() for p in score_files):
        loaded = [np.load(p) for p in score_files]
        scores = {k: np.stack([f[k] for f in loaded]) for k in loaded[0].files}
    infos = [json.loads((d / "main.json").read_text()) for d in dirs]
    return RegimeData(arms, scores, _stack_files([d / "secondary.npz" for d in dirs]), infos,
                      sum(_cpu(d) for d in dirs))


# ------------------------------------------------------------------------------------------------ statistics
def _late(num_steps: int) -> list[int]:
    return list(range(num_steps // 2, num_steps))


def arm_stat(arms: dict[str, list[StackedStep]], arm: str, metric: str, steps: str | list[int], reps: Replicates,
             count: int | None = None) -> torch.Tensor:
    """``[R]`` one statistic of one arm (``kl_excess`` subtracts the KL of the arm's exact floor; ``count`` keeps the
    first samples only, e.g. those that have an oracle)."""
    data = arms[arm] if count is None else [s.subset(count) for s in arms[arm]]
    if steps == "sequence":
        return sequence_excess(data, reps)
    chosen = _late(len(data)) if steps == "late" else list(range(len(data))) if steps == "all" else steps
    if metric == "kl_excess":
        floor = arms[FLOOR_OF[arm]] if count is None else [s.subset(count) for s in arms[FLOOR_OF[arm]]]
        return arm_metric(data, "kl", reps, chosen) - arm_metric(floor, "kl", reps, chosen)
    return arm_metric(data, metric, reps, chosen)


def _score_stat(scores: np.ndarray, which: str, reps: Replicates, t_index: int = 0) -> torch.Tensor:
    k = 0 if which == "first" else scores.shape[1] - 1
    return reps.mean(torch.from_numpy(scores[:, k, t_index]))  # (S, B) -> (R,)


def _side(spec: tuple, data: dict, count: int | None) -> tuple[Callable, int]:
    """A statistic function of one side of a criterion and its sample count (``count``: the first samples only)."""
    kind = spec[0]
    if kind == "scores":
        scores = data[spec[1]].scores[spec[2]]
        return (lambda r: _score_stat(scores, spec[3], r)), scores.shape[-1]
    arms = data["controls"] if kind == "controls" else data[kind].arms
    n = count or arms[spec[1]][0].excess_joint.shape[1]
    return (lambda r: arm_stat(arms, spec[1], spec[2], spec[3], r, count)), n


def judge(crit: Criterion, data: dict, num_seeds: int, bootstrap: int) -> dict:
    """Evaluate one criterion (``"missing"`` when a run it needs is absent). A comparison with the oracle arm uses
    the samples that have an oracle; the controls are one model (one seed)."""
    specs = [crit.a, crit.b] + ([*crit.baseline] if crit.baseline else [])
    try:
        count = None
        for s in specs:
            if s[0] not in ("scores", "controls") and s[1] == "oracle":
                count = data[s[0]].arms["oracle"][0].excess_joint.shape[1]
        sides = [_side(s, data, count) for s in specs]
    except (KeyError, AttributeError, TypeError):
        return {**asdict(crit), "verdict": "missing"}
    n = sides[0][1]
    seeds = 1 if crit.a[0] == "controls" else num_seeds
    reps = Replicates.draw(seeds, n, bootstrap, seed=zlib.crc32(crit.name.encode()))

    def stat(r: Replicates) -> torch.Tensor:
        values = [f(r) for f, _ in sides]
        diff = values[0] - values[1]
        return diff - (values[2] - values[3]) if crit.baseline else diff

    ci = estimate(stat, seeds, n, reps)
    return {**asdict(crit), **ci, "verdict": verdict(ci, crit.predicted)}


def _diff_ci(arms: dict, a: tuple, b: tuple | None, seeds: int, n: int, reps: Replicates,
             count: int | None = None) -> dict:
    """CI of ``arm_stat(*a) - arm_stat(*b)`` (``b`` None: of ``arm_stat(*a)``); ``a``/``b`` = (arm, metric, steps)."""

    def stat(q: Replicates) -> torch.Tensor:
        value = arm_stat(arms, *a, q, count)
        return value if b is None else value - arm_stat(arms, *b, q, count)

    return estimate(stat, seeds, n, reps)


def per_step_table(arms: dict[str, list[StackedStep]], num_seeds: int, bootstrap: int) -> dict:
    """``arm -> metric -> [per step {value, lo, hi}]``, the per-step gaps GEN - TF and GEN - ORACLE, and the sequence
    excess NLL per arm."""
    n, steps = arms["gen"][0].excess_joint.shape[1], range(len(arms["gen"]))
    reps = Replicates.draw(num_seeds, n, bootstrap, seed=1)
    n_oracle = arms["oracle"][0].excess_joint.shape[1] if "oracle" in arms else None
    reps_oracle = Replicates.draw(num_seeds, n_oracle, bootstrap, seed=2) if n_oracle else None
    table: dict = {}
    for arm in arms:
        metrics = [m for m in STEP_METRICS if m != "kl_excess" or FLOOR_OF.get(arm)]
        count, r = (n_oracle, reps_oracle) if arm == "oracle" else (None, reps)
        table[arm] = {m: [_diff_ci(arms, (arm, m, [k]), None, num_seeds, count or n, r, count) for k in steps]
                      for m in metrics}
    gaps: dict = {"gen_minus_tf": {}, "gen_minus_oracle": {}}
    for m in ("excess_token", "kl_excess") if "tf" in arms else ():
        gaps["gen_minus_tf"][m] = [_diff_ci(arms, ("gen", m, [k]), ("tf", m, [k]), num_seeds, n, reps) for k in steps]
        if n_oracle:
            gaps["gen_minus_oracle"][m] = [_diff_ci(arms, ("gen", m, [k]), ("oracle", m, [k]), num_seeds, n_oracle,
                                                    reps_oracle, n_oracle) for k in steps]
    sequence = {arm: _diff_ci(arms, (arm, "excess_joint", "sequence"), None, num_seeds, n, reps)
                for arm in ("gen", "tf", "exact_gen") if arm in arms}
    return {"per_step": table, "gaps": gaps, "sequence_excess": sequence}


def score_table(scores: dict[str, np.ndarray], timesteps: list[int], bootstrap: int) -> dict:
    """``key -> [per step [per timestep {value, lo, hi}]]`` of the Theorem 2 norms."""
    s, k_steps, t_steps, n = next(iter(scores.values())).shape
    reps = Replicates.draw(s, n, bootstrap, seed=4)
    out: dict = {"timesteps": timesteps}
    for key, arr in scores.items():
        values = torch.from_numpy(arr)  # (S, K, T, B)
        out[key] = [[estimate(lambda q, v=values[:, k, t]: q.mean(v), s, n, reps) for t in range(t_steps)]
                    for k in range(k_steps)]
    return out


def controls_table(arms: dict[str, list[StackedStep]], bootstrap: int) -> dict:
    """Per control and step: the change of KL and per-token excess NLL against the clean run (one model)."""
    n = arms["clean"][0].excess_joint.shape[1]
    reps = Replicates.draw(1, n, bootstrap, seed=5)
    out: dict = {}
    for name in arms:
        if name == "clean":
            continue
        out[name] = {m: [_diff_ci(arms, (name, m, [k]), ("clean", m, [k]), 1, n, reps)
                         for k in range(len(arms["clean"]))] for m in ("kl", "excess_token", "dispersion")}
    return out


# ------------------------------------------------------------------------------------------------ outputs
def build_summary(out: Path, tier, regimes: dict, cost: dict) -> dict:
    """Everything the study measured, with CIs, and the criteria's verdicts."""
    data: dict = {}
    summary: dict = {"settings": {"tier": asdict(tier), "regimes": {k: asdict(v) for k, v in regimes.items()}},
                     "regimes": {}, "criteria": []}
    seeds = tuple(tier.seeds)
    for name in tier.regimes:
        reg = load_regime(out, name, seeds)
        if reg is None:
            continue
        data[name] = reg
        entry = {"num_steps": len(reg.arms["gen"]), "late_steps": _late(len(reg.arms["gen"])),
                 "tokens_per_step": [s.num_tokens for s in reg.arms["gen"]],
                 **per_step_table(reg.arms, len(seeds), tier.bootstrap)}
        if reg.scores is not None:
            entry["scores"] = score_table(reg.scores, reg.infos[0]["scores"]["timesteps"], tier.bootstrap)
        if "oracle_info" in reg.infos[0]:
            entry["oracle_info"] = [info["oracle_info"] for info in reg.infos]
        if reg.secondary is not None:
            entry["secondary"] = {"cfg": tier.cfg_secondary, **per_step_table(reg.secondary, len(seeds),
                                                                                tier.bootstrap)}
        entry["cpu_seconds"] = reg.cpu_seconds
        summary["regimes"][name] = entry
    control_dir = out / tier.control_regime / f"seed{seeds[0]}"
    controls = _stack_files([control_dir / "controls.npz"])
    if controls is not None:
        data["controls"] = controls
        info = json.loads((control_dir / "controls.json").read_text())
        summary["controls"] = {"regime": tier.control_regime, "seed": seeds[0], **info.get("controls", {}),
                               "delta": controls_table(controls, tier.bootstrap)}
    summary["criteria"] = [judge(c, data, len(seeds), max(tier.bootstrap, 1000)) for c in CRITERIA]
    cpu = sum(entry.get("cpu_seconds", 0.0) for entry in summary["regimes"].values())
    summary["cost"] = {**cost, "cpu_seconds_all_runs": cpu, "wall_estimate_2_cores_minutes": cpu / 2 / 60}
    return summary


def write_summary(out: Path, tier, regimes: dict, results: Path, tier_name: str, cost: dict) -> list[Path]:
    """Write ``condition-error-study-gmm[-<tier>].{json,md,png}`` to ``results``; return the paths."""
    summary = build_summary(out, tier, regimes, cost)
    results.mkdir(parents=True, exist_ok=True)
    stem = "condition-error-study-gmm" + ("" if tier_name == "full" else f"-{tier_name}")
    js, md, png = (results / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    atomic_write_text(js, json.dumps(summary, indent=1) + "\n")
    atomic_write_text(md, format_markdown(summary))
    plot_summary(summary, png)
    return [js, md, png]
