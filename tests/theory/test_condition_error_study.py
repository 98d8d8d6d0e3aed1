"""The condition-error study's summary: paired bootstrap verdicts on planted effects, outputs, resumable tiers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ar import GMMSource
from lightning_ar.theory.bootstrap import Replicates, estimate, verdict
from lightning_ar.theory.ground_truth import exact_trace, mar_step_positions, trace_truth
from lightning_ar.theory.truth_stats import arm_metric, load_arms, save_arms, stack

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import condition_error_study as study  # noqa: E402
import condition_error_summary as summary  # noqa: E402


def _arm(source: GMMSource, labels, positions, seed: int, distort: float = 1.0, context=None):
    trace = exact_trace(source, labels, positions, torch.Generator().manual_seed(seed), joint=False, context=context)
    for rec in trace.steps[len(trace.steps) // 2 :]:
        rec.tokens = rec.tokens * distort  # planted error at the late steps only
    return trace, trace_truth(source, trace, context=None if context is None else context)


def _write_run(folder: Path, source: GMMSource, seed: int, gen_distort: float) -> None:
    """Fake a run's files: ``gen`` with a planted late-step error, the other arms exact."""
    labels = torch.arange(96) % source.num_classes
    positions = mar_step_positions(96, source.grid**2, 4, torch.Generator().manual_seed(seed))
    gen_trace, gen = _arm(source, labels, positions, 10 + seed, gen_distort)
    seq = gen_trace.sequence().double()
    exact_gen = trace_truth(source, exact_trace(source, labels, positions, torch.Generator().manual_seed(20 + seed),
                                                joint=False, context=seq), context=seq)
    _, tf = _arm(source, labels, positions, 30 + seed)
    arms = {"gen": gen, "tf": tf, "exact_gen": exact_gen, "exact_tf": tf, "oracle": [s for s in exact_gen]}
    folder.mkdir(parents=True)
    save_arms(folder / "main.npz", arms)
    scores = {k: np.random.default_rng(seed).normal(1.0, 0.1, (4, 3, 96)) for k in
              ("model_score", "true_score", "model_guidance", "true_guidance")}
    scores["true_score"][:, :, :] += np.arange(4)[:, None, None]  # planted: rises over AR steps
    np.savez(folder / "main_scores.npz", **scores)
    (folder / "main.json").write_text(json.dumps({"scores": {"timesteps": [100, 500, 900]}}))


def test_saved_arms_round_trip(tmp_path: Path) -> None:
    source = GMMSource(num_classes=2, grid=2, token_dim=2, sizes=(8, 4, 4))
    _, arm = _arm(source, torch.arange(8) % 2, mar_step_positions(8, 4, 2, torch.Generator().manual_seed(0)), 0)
    save_arms(tmp_path / "a.npz", {"gen": arm})
    back = load_arms(tmp_path / "a.npz")["gen"]
    assert [s.num_tokens for s in back] == [s.num_tokens for s in arm]
    for a, b in zip(arm, back):
        torch.testing.assert_close(a.res_outer.double(), b.res_outer.double())


def test_bootstrap_verdicts_on_planted_and_null_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 400, generator=gen, dtype=torch.float64)
    reps = Replicates.draw(3, 400, 500, seed=1)
    planted = estimate(lambda r: r.mean(x + 0.3) - r.mean(x), 3, 400, reps)
    assert verdict(planted, "> 0") == "holds" and verdict(planted, "< 0") == "does not hold"
    null = estimate(lambda r: r.mean(x) - r.mean(torch.randn(3, 400, generator=gen, dtype=torch.float64)), 3, 400,
                    reps)
    assert verdict(null, "> 0") == "not resolved"


def test_summary_judges_planted_effects(tmp_path: Path) -> None:
    source = GMMSource(num_classes=2, grid=3, token_dim=2, sizes=(8, 4, 4))
    for seed in (0, 1):
        _write_run(tmp_path / "R0" / f"seed{seed}", source, seed, gen_distort=1.4)  # over-dispersed late steps
        _write_run(tmp_path / "R1" / f"seed{seed}", source, seed, gen_distort=1.0)  # exact everywhere
    tier = study.Tier(seeds=(0, 1), num_samples=96, bootstrap=200, regimes=("R0", "R1"))
    regimes = {k: study.REGIMES[k] for k in ("R0", "R1")}
    paths = summary.write_summary(tmp_path, tier, regimes, tmp_path / "results", "quick", {})
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.is_file() for p in paths)
    result = json.loads(paths[0].read_text())
    verdicts = {c["name"]: c["verdict"] for c in result["criteria"]}
    assert verdicts["accumulated_R0"] == "holds"  # planted GEN error, exact TF
    assert verdicts["accumulated_R1"] == "not resolved"  # no error anywhere
    assert verdicts["oracle_gap_R0"] == "holds"
    assert verdicts["mask_ratio_gen"] == "holds"  # R1 (exact) below R0 (distorted)
    assert verdicts["thm2_true_score_R0"] == "does not hold"  # planted rise: no decay
    assert verdicts["undertrained"] == "missing"  # no R2/R3 runs: nothing is invented
    late = result["regimes"]["R0"]["late_steps"]
    assert late == [2, 3]
    early = result["regimes"]["R0"]["gaps"]["gen_minus_tf"]["kl_excess"][0]
    assert early["lo"] < 0 < early["hi"]  # nothing planted before K/2
    assert "| R0 |" in paths[1].read_text()


def test_study_options_and_budgets() -> None:
    steps = study.config_steps(study.REPO / "configs" / "gmm" / "mar.yaml")
    assert steps == study.config_steps(study.REPO / "configs" / "gmm" / "mar_grid8.yaml") > 0
    assert study.REGIMES["R3"].budget_fraction == 0.25
    assert "--model.init_args.mask_ratio_min" in study.REGIMES["R1"].extra
    with pytest.raises(SystemExit):
        study.parse_args(["--jobs", "0"])


def test_arm_metric_matches_plain_mean() -> None:
    source = GMMSource(num_classes=2, grid=2, token_dim=2, sizes=(8, 4, 4))
    _, arm = _arm(source, torch.arange(16) % 2, mar_step_positions(16, 4, 2, torch.Generator().manual_seed(0)), 0)
    stacked = stack([arm])
    ident = Replicates.identity(1, 16)
    assert float(arm_metric(stacked, "excess_token", ident, [1])) == pytest.approx(float(arm[1].excess_token.mean()))
