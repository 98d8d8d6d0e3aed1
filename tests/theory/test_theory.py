"""Theory checks: curve fits against known curves, the two monitors on tiny models, the report."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers.tiny import TINY, save_generator_checkpoint
from lightning.pytorch.callbacks import Callback

from lightning_ar import LatentDataModule, MARGenerator, OTRefinement
from lightning_ar.callbacks import ConditionalScoreNormMonitor, SinkhornDivergenceMonitor
from lightning_ar.nn import DiffusionLoss, GenerationTrace
from lightning_ar.nn.labelled_conditions import LabelledConditions
from lightning_ar.nn.refine import FlowOptions
from lightning_ar.nn.refiners import FlowSettings, labelled_divergence
from lightning_ar.theory import (
    fit_contraction,
    fit_exponential_decay,
    score_norms,
    sinkhorn_curves,
    write_theory_report,
)
from lightning_ar.theory.conditions import StepPool, condition_statistics, refinement_verdict
from lightning_ar.theory.dispersion import dispersion_ratio, null_test, pooled_dispersion
from lightning_ar.theory.fits import decay_claim
from lightning_ar.theory.flow_claims import flow_claims
from lightning_ar.theory.grouped_sinkhorn import group_clouds, grouped_divergence
from lightning_ar.theory.report import sinkhorn_section
from lightning_ar.theory.stats import PairedComparison, paired_difference, verdict

STEPS = np.arange(12)


# ------------------------------------------------------------------------------------------------------ fits
@pytest.mark.parametrize(("amp", "beta", "floor"), [(5.0, 0.7, 1.0), (2.0, 0.5, 0.3), (10.0, 0.85, -2.0),
                                                     (1.0, 0.3, 4.0)])
def test_fit_recovers_known_decay(amp: float, beta: float, floor: float) -> None:
    noise = np.random.default_rng(0).normal(0.0, 0.01 * amp, STEPS.size)
    fit = fit_exponential_decay(STEPS, amp * beta**STEPS + floor + noise)
    assert fit.beta == pytest.approx(beta, rel=0.05)
    assert fit.beta_ci[0] <= fit.beta <= fit.beta_ci[1]
    assert fit.M == pytest.approx(amp, rel=0.1)
    assert fit.r2 > 0.99 and fit.exponential_better and fit.holds


def test_fit_exact_decay_is_exact() -> None:
    fit = fit_exponential_decay(STEPS, 3.0 * 0.6**STEPS + 0.5)
    assert (fit.M, fit.beta, fit.floor) == pytest.approx((3.0, 0.6, 0.5), rel=1e-6)
    assert fit.rmse < 1e-8 and fit.to_dict()["beta_ci"] == pytest.approx([0.6, 0.6], rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_fit_of_pure_noise_does_not_hold(seed: int) -> None:
    fit = fit_exponential_decay(STEPS, np.random.default_rng(seed).normal(size=STEPS.size))
    assert fit.r2 < 0.5 and not fit.holds


@pytest.mark.parametrize("slope", [-1.0, 2.0])
def test_fit_of_a_line_is_not_exponential(slope: float) -> None:
    """An exact line: the exponential model degenerates to beta -> 1 with a huge M, and loses to the line by AIC."""
    fit = fit_exponential_decay(STEPS, 10.0 + slope * STEPS)
    assert fit.beta == pytest.approx(1.0, abs=1e-3)
    assert not fit.exponential_better and not fit.holds
    assert fit.linear_r2 == pytest.approx(1.0)


@pytest.mark.parametrize("values", [[0.0, 1.0, 2.0], [1.0] * 6, [1.0, math.nan, 2.0, 3.0]])
def test_fit_of_too_short_or_constant_input_is_nan(values: list[float]) -> None:
    fit = fit_exponential_decay(range(len(values)), values)
    assert math.isnan(fit.beta) and not fit.holds


def test_rising_and_growing_curves_do_not_hold() -> None:
    rising = fit_exponential_decay(STEPS, 1.0 - 0.8**STEPS)  # saturates from below: M < 0
    growing = fit_exponential_decay(STEPS, 2.0 * 1.1**STEPS)  # beta > 1
    assert rising.beta == pytest.approx(0.8) and rising.M < 0 and not rising.holds
    assert growing.beta == pytest.approx(1.1) and not growing.holds


def test_contraction_of_geometric_and_non_monotone_traces() -> None:
    geometric = fit_contraction(3.0 * 0.6 ** np.arange(11))
    assert geometric["rho"] == pytest.approx(0.6) and geometric["rho_bound"] == pytest.approx(0.6)
    assert geometric["fraction_monotone"] == 1.0
    bumpy = fit_contraction([4.0, 3.0, 3.5, 2.0, 2.2, 1.0])
    assert bumpy["fraction_monotone"] == pytest.approx(0.6) and bumpy["rho"] == pytest.approx(0.75)
    assert bumpy["rho_bound"] == pytest.approx((3.5 / 4) ** 0.5)  # the smallest rho with v_k <= rho^k v_0
    with_floor = fit_contraction([0.5 + 2.0 * 0.5**k for k in range(11)])
    assert with_floor["rho_floor"] == pytest.approx(0.5) and with_floor["floor"] == pytest.approx(0.5)
    zeros = fit_contraction(np.zeros(5))
    assert math.isnan(zeros["rho"]) and zeros["fraction_monotone"] == 1.0


# ------------------------------------------------------------------------------------------------- measures
class _EchoNet(torch.nn.Module):
    """A denoiser whose predicted noise is the first ``Dt`` coordinates of the condition."""

    def __init__(self, token_dim: int) -> None:
        super().__init__()
        self.token_dim = token_dim

    def forward(self, x, t, z):
        return torch.cat([z[:, : self.token_dim], torch.zeros_like(x)], dim=-1)


def _record(trace: GenerationTrace, k: int, z, z_null=None, **fields) -> None:
    b, n = z.shape[:2]
    trace.record(k, 0, 1.0, positions=torch.zeros(b, n, dtype=torch.long), conditions=z, raw_conditions=None,
                 null_conditions=z_null, tokens=torch.randn(b, n, 2))
    for name, value in fields.items():
        setattr(trace.steps[-1], name, value)


def test_score_norms_are_eps_norm_over_sigma() -> None:
    head = DiffusionLoss(token_dim=2, cond_dim=3, width=8, depth=1)
    head.net = _EchoNet(2)
    trace = GenerationTrace()
    z = torch.tensor([[[3.0, 4.0, 0.0]], [[0.0, 1.0, 0.0]]])  # eps norms 5 and 1 -> mean 3
    _record(trace, 0, z, z_null=torch.zeros_like(z))
    _record(trace, 1, 2 * z, z_null=z)
    norms = score_norms(head, trace, [100, 900], torch.Generator().manual_seed(0))
    sigma = (1 - head.alphas_cumprod[[100, 900]].double()).sqrt().numpy()
    assert norms.score == pytest.approx(np.array([3.0 / sigma, 6.0 / sigma]), rel=1e-5)
    assert norms.guidance == pytest.approx(np.array([3.0 / sigma, 3.0 / sigma]), rel=1e-5)


def test_sinkhorn_curves_summary_skips_trivial_flow_traces() -> None:
    trace = GenerationTrace()
    z = torch.zeros(1, 1, 3)
    _record(trace, 0, z, divergence_before=0.0, divergence_after=0.0, flow_trace=torch.zeros(3))
    _record(trace, 1, z, divergence_before=2.0, divergence_after=1.0, flow_trace=torch.tensor([4.0, 2.0, 1.0]))
    _record(trace, 2, z, divergence_before=2.0, divergence_after=0.0, flow_trace=torch.tensor([4.0, 1.0, 2.0]))
    s = sinkhorn_curves(trace).summary()
    assert s["reduction"] == pytest.approx(1 - 1.0 / 4.0) and s["before_mean"] == pytest.approx(4.0 / 3)
    assert s["num_flow_traces"] == 2 and s["fraction_monotone"] == pytest.approx(3 / 4)
    assert s["rho"] == pytest.approx((0.5 + 1.125) / 2) and s["rho_bound"] == pytest.approx(0.5**0.5)


# ------------------------------------------------------------------------------------------------- monitors
def _trainer(root: Path, callbacks: list[Callback], **kwargs) -> L.Trainer:
    base = dict(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, enable_checkpointing=False)
    return L.Trainer(callbacks=callbacks, **{**base, **kwargs})


class _ModeProbe(Callback):
    """Records whether every submodule is in train mode at each training batch."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append(all(m.training for m in pl_module.modules()))


SCORE_KEYS = ["theory/score_norm_beta", "theory/score_norm_floor", "theory/score_norm_M", "theory/score_norm_r2",
              "theory/score_norm_exp_better", "theory/score_norm_holds", "theory/guidance_norm_first",
              "theory/guidance_norm_last", "theory/guidance_norm_beta", "theory/guidance_norm_holds"]


def test_score_monitor_logs_plots_reports_and_restores_train_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = LatentDataModule("digits", batch_size=16)
    model = MARGenerator(dm.latent_shape, dm.num_classes, dm.latent_scale, **TINY)
    monitor = ConditionalScoreNormMonitor(num_per_class=1, cfg=2.0, timesteps=(100, 900), classes=[0, 1, 2],
                                          bootstrap=20)
    probe = _ModeProbe()
    trainer = _trainer(tmp_path, [monitor, probe], max_steps=2, limit_val_batches=1, val_check_interval=1)
    trainer.fit(model, dm)
    assert set(SCORE_KEYS) <= set(trainer.callback_metrics)
    assert probe.modes == [True, True]  # the second batch follows a validation with generation
    assert monitor.last["stage"] == "val" and monitor.last["global_step"] >= 1
    assert model.training
    assert set(SCORE_KEYS) <= set(monitor.last["metrics"])
    norms = monitor.last["norms"]
    assert np.array(norms["score"]).shape == (TINY["num_iter"], 2) and all(v > 0 for v in norms["score_mean"])
    assert (tmp_path / "theory" / "score_norm_val.png").stat().st_size > 0
    report = (tmp_path / "theory_report.md").read_text()
    assert "Theorem 2" in report and "What this measures" in report and "Guidance term `g_i`" in report
    assert any(f"**{v}**" in report for v in ("holds", "does not hold", "not resolved", "not measurable"))
    assert "theory/score_norm_val.png" in report and "Sinkhorn" not in report


def test_score_monitor_keys_reach_callback_metrics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = LatentDataModule("digits", batch_size=16)
    model = MARGenerator(dm.latent_shape, dm.num_classes, dm.latent_scale, **TINY)
    monitor = ConditionalScoreNormMonitor(num_per_class=1, cfg=2.0, timesteps=(500,), classes=[3], plot=False,
                                          bootstrap=20)
    trainer = _trainer(tmp_path, [monitor], limit_test_batches=1)
    trainer.test(model, dm, verbose=False)
    assert set(SCORE_KEYS) <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["theory/score_norm_beta"] == pytest.approx(monitor.last["fit"]["beta"], nan_ok=True)
    assert (tmp_path / "theory_report.md").is_file() and not (tmp_path / "theory" / "score_norm_test.png").exists()


def test_disabled_monitor_and_bad_options(tmp_path: Path, tiny_generator: MARGenerator) -> None:
    dm = LatentDataModule("digits", batch_size=16)
    _trainer(tmp_path, [ConditionalScoreNormMonitor(enabled=False)], limit_test_batches=1).test(
        tiny_generator, dm, verbose=False)
    assert not (tmp_path / "theory_report.md").exists()
    with pytest.raises(ValueError, match="timesteps"):
        _trainer(tmp_path, [ConditionalScoreNormMonitor(timesteps=(1000,))], limit_test_batches=1).test(
            tiny_generator, dm, verbose=False)
    _trainer(tmp_path, [SinkhornDivergenceMonitor(enabled=False)], limit_test_batches=1).test(
        tiny_generator, dm, verbose=False)  # disabled: not even checked
    with pytest.raises(ValueError, match="refine"):
        _trainer(tmp_path, [SinkhornDivergenceMonitor(generate_kwargs={"refine": "flow"})]).test(tiny_generator, dm)
    with pytest.raises(TypeError, match="OTRefinement"):
        _trainer(tmp_path, [SinkhornDivergenceMonitor()], limit_test_batches=1).test(tiny_generator, dm, verbose=False)


def test_sinkhorn_monitor_on_ot_refinement(tmp_path: Path) -> None:
    ckpt = save_generator_checkpoint(tmp_path / "gen.ckpt", "gmm")
    dm = LatentDataModule("gmm", batch_size=32)
    module = OTRefinement(ckpt, dm.latent_shape, dm.num_classes, dm.latent_scale, bank_capacity=256,
                          heldout_capacity=128, teacher_passes=1, target_size=128, flow_steps=3)
    _trainer(tmp_path, [], max_epochs=1, limit_train_batches=2, limit_val_batches=2).fit(module, dm)
    monitor = SinkhornDivergenceMonitor(num_per_class=4, num_batches=2, bootstrap=20)
    score = ConditionalScoreNormMonitor(num_per_class=1, timesteps=(500,), plot=False,
                                        generate_kwargs={"refine": "none"}, bootstrap=20)
    trainer = _trainer(tmp_path, [monitor, score], limit_test_batches=1)
    trainer.test(module, dm, verbose=False)
    keys = ["theory/sinkhorn_before_mean", "theory/sinkhorn_after_mean", "theory/sinkhorn_reduction",
            "theory/sinkhorn_reduction_low", "theory/sinkhorn_reduction_high", "theory/dispersion_ratio_before",
            "theory/dispersion_ratio_after", "theory/refinement_improves", "theory/null_max_ratio"]
    assert set(keys) <= set(trainer.callback_metrics)
    flow = monitor.last["modes"]["flow"]
    assert len(flow["steps"]) == TINY["num_iter"] and flow["steps"][0]["trivial"]  # step 0: nothing revealed
    assert all(st["num_conditions"] > 0 and not st["trivial"] for st in flow["steps"][1:])
    assert all(len(tr) == 4 for tr in flow["inner_flow"]["flow_traces"])
    assert flow["flow"]["monotone"] == "not measurable"  # 3 flow steps < 10
    assert set(flow["null"]) == {1, 2, 3} and flow["verdict"] in ("holds", "does not hold", "not resolved",
                                                                   "collapse", "over-dispersion")
    assert (tmp_path / "theory" / "sinkhorn_test.png").stat().st_size > 0
    report = (tmp_path / "theory_report.md").read_text()
    assert "Theorem 2" in report and "dispersion ratio" in report and "null test" in report
    assert "What this measures" in report and "not measurable" in report


def test_report_concatenates_existing_sections(tmp_path: Path) -> None:
    curve = 2.0 * 0.5 ** STEPS[:5] + 1.0
    per_sample = curve[:, None] + np.random.default_rng(0).normal(0, 0.01, (5, 40))
    fit = fit_exponential_decay(STEPS[:5], curve).to_dict()
    score = {"stage": "test", "global_step": 0, "num_samples": 40, "cfg": 1.0, "fit": fit, "plot": None,
             "norms": {"timesteps": [500], "score": [[v] for v in curve], "score_mean": list(curve),
                       "guidance": None, "guidance_mean": None},
             "claim_score": decay_claim(per_sample, reps=50), "claim_guidance": None}
    path = write_theory_report(tmp_path, score=score)
    text = path.read_text()
    assert path == tmp_path / "theory_report.md" and "**holds**" in text and "Sinkhorn" not in text
    assert write_theory_report(tmp_path).read_text() == text  # no new section: the existing one is kept


# -------------------------------------------------------------------------------------- paired verdicts
def test_verdicts_follow_the_ci() -> None:
    assert verdict(-2.0, -0.1, "negative") == "holds" and verdict(0.1, 2.0, "negative") == "does not hold"
    assert verdict(-1.0, 1.0, "negative") == "not resolved" and verdict(0.1, 2.0, "positive") == "holds"
    assert verdict(math.nan, 1.0, "positive") == "not measurable"
    rng = np.random.default_rng(0)
    b = rng.normal(size=50)
    assert paired_difference(b + 1.0 + 0.1 * rng.normal(size=50), b, "positive").verdict == "holds"
    assert paired_difference(b + 0.1 * rng.normal(size=50), b, "positive").verdict == "not resolved"
    assert paired_difference(b - 1.0, b, "positive").verdict == "does not hold"


def test_decay_claim_holds_fails_or_is_unresolved() -> None:
    rng = np.random.default_rng(0)
    decay = (3.0 * 0.6 ** STEPS + 1.0)[:, None] + rng.normal(0, 0.2, (STEPS.size, 60))
    flat = np.ones((STEPS.size, 60)) + rng.normal(0, 0.2, (STEPS.size, 60))
    rising = (1.0 + 0.1 * STEPS)[:, None] + rng.normal(0, 0.2, (STEPS.size, 60))
    assert decay_claim(decay, reps=60)["verdict"] == "holds"
    assert decay_claim(flat, reps=60)["verdict"] == "not resolved"
    assert decay_claim(rising, reps=60)["verdict"] == "does not hold"
    assert decay_claim(decay[:3], reps=50)["verdict"] == "not measurable"


# ---------------------------------------------------------------------------------- condition statistics
CLASSES, POSITIONS, DIM = 10, 16, 8
MEANS = torch.randn(CLASSES * POSITIONS, DIM, generator=torch.Generator().manual_seed(99)) * 3


def _conditions(n: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` conditions ``mu_group + scale * N(0, I)`` over 10 classes x 16 positions."""
    g = torch.Generator().manual_seed(seed)
    labels, positions = torch.randint(0, CLASSES, (n,), generator=g), torch.randint(0, POSITIONS, (n,), generator=g)
    return MEANS[labels * POSITIONS + positions] + scale * torch.randn(n, DIM, generator=g), labels, positions


def _shrink(z: torch.Tensor, groups: torch.Tensor, factor: float) -> torch.Tensor:
    """``z`` scaled by ``factor`` about its own group means."""
    uniq, inv = torch.unique(groups, return_inverse=True)
    means = torch.zeros(len(uniq), z.shape[1]).index_add_(0, inv, z) / torch.bincount(inv)[:, None]
    return means[inv] + factor * (z - means[inv])


@pytest.mark.parametrize(("factor", "state"), [(1.0, "consistent"), (0.5, "collapsed"), (1.5, "over-dispersed")])
def test_dispersion_ratio_reads_one_and_detects_injected_shrinkage_and_overdispersion(factor: float, state: str):
    ref, rl, rp = _conditions(2000, seed=1)
    z, zl, zp = _conditions(1000, seed=2)
    groups = zl * POSITIONS + zp
    r = dispersion_ratio(_shrink(z, groups, factor), groups, ref, rl * POSITIONS + rp)
    assert r.ratio == pytest.approx(factor**2, abs=4 * r.se) and r.se < 0.06 * factor**2 and r.state == state


def test_dispersion_ratio_standard_error_is_calibrated_and_sees_clusters() -> None:
    ref, rl, rp = _conditions(1500, seed=1)
    ratios, ses = [], []
    for seed in range(40):
        z, zl, zp = _conditions(600, seed=10 + seed)
        r = dispersion_ratio(z, zl * POSITIONS + zp, ref, rl * POSITIONS + rp)
        ratios.append(r.ratio)
        ses.append(r.se)
    assert 0.6 < np.std(ratios, ddof=1) / np.sqrt(np.mean(np.square(ses))) < 1.6
    # pairs of conditions sharing their noise (two tokens of one image): the cluster-robust SE is larger
    z, zl, zp = _conditions(300, seed=5)
    shared = torch.cat([z, z - MEANS[zl * POSITIONS + zp] + MEANS[(zl * POSITIONS + (zp + 1) % POSITIONS)]])
    groups = torch.cat([zl * POSITIONS + zp, zl * POSITIONS + (zp + 1) % POSITIONS])
    iid = pooled_dispersion(shared, groups)
    clustered = pooled_dispersion(shared, groups, torch.arange(300).repeat(2))
    assert clustered.value == pytest.approx(iid.value) and clustered.se > 1.2 * iid.se


def test_dispersion_ratio_without_variation_is_not_measurable() -> None:
    labels = torch.arange(10).repeat(20)
    exact = MEANS[labels]  # every condition at its group mean (AR step 0)
    assert dispersion_ratio(exact, labels, exact, labels).state == "not measurable"


def test_grouped_divergence_equals_the_labelled_divergence() -> None:
    z, zl, zp = _conditions(300, seed=3)
    ref, rl, rp = _conditions(700, seed=4)
    for blur in (0.5, 1.5):
        settings = FlowSettings(FlowOptions(blur=blur, scaling=0.5), label_weight=100.0)
        expected = float(labelled_divergence(LabelledConditions(z, zl, zp), LabelledConditions(ref, rl, rp), CLASSES,
                                             POSITIONS, settings))
        clouds = group_clouds(z, zl * POSITIONS + zp, ref, rl * POSITIONS + rp)
        weights = torch.stack([torch.ones(300), 2 * torch.ones(300), (torch.arange(300) >= 100).double()])
        got = grouped_divergence(clouds, weights, blur)
        assert float(got[0]) == pytest.approx(expected, rel=5e-3) and float(got[1]) == pytest.approx(float(got[0]))
        subset = group_clouds(z[100:], zl[100:] * POSITIONS + zp[100:], ref, rl * POSITIONS + rp)
        assert float(got[2]) == pytest.approx(float(grouped_divergence(subset, torch.ones(1, 200), blur)[0]),
                                              rel=1e-4)  # zero weight = point left out (up to the diameter)


def _pool(raw: torch.Tensor, refined: torch.Tensor, labels, positions) -> StepPool:
    return StepPool(raw, refined, labels, positions, torch.arange(len(raw)) // 2)  # two conditions per image


def test_condition_statistics_call_collapse_collapse_and_a_real_correction_an_improvement() -> None:
    ref, rl, rp = _conditions(1600, seed=1)
    z, zl, zp = _conditions(800, seed=2)
    groups = zl * POSITIONS + zp
    bias = torch.zeros(DIM)
    bias[0] = 1.0  # a mean error of about the within-group spread per dimension
    refs = [(ref, rl, rp)]
    corrected = condition_statistics([_pool(z + bias, z, zl, zp)], refs, POSITIONS, True, reps=40)
    collapsed = condition_statistics([_pool(z, _shrink(z, groups, 0.3), zl, zp)], refs, POSITIONS, True, reps=40)
    identity = condition_statistics([_pool(z, z, zl, zp)], refs, POSITIONS, True, reps=20)
    assert corrected["reduction"]["high"] < 0 and corrected["verdict"] == "holds"
    assert collapsed["reduction"]["high"] < 0 and collapsed["ratio_after"]["state"] == "collapsed"
    assert collapsed["verdict"] == "collapse"  # a lower divergence by collapse never "holds"
    assert identity["verdict"] == "not resolved" and identity["reduction"]["estimate"] == 0.0


def test_refinement_verdict_never_holds_outside_the_band() -> None:
    lower = PairedComparison(-1.0, -1.5, -0.5, 10, "holds")
    assert refinement_verdict(lower, 1.0) == "holds" and refinement_verdict(lower, 0.5) == "collapse"
    assert refinement_verdict(lower, 1.3) == "over-dispersion"
    assert refinement_verdict(PairedComparison(0.1, -0.2, 0.4, 10, "not resolved"), 1.0) == "not resolved"
    assert refinement_verdict(None, 1.0) == "not measurable"


def test_null_test_reads_zero_for_the_identity_and_fails_a_shrinking_refiner() -> None:
    z, zl, zp = _conditions(1024, seed=6)

    def shrink(x, labels, positions, step):  # toward the group means of each refinement call
        return _shrink(x, labels * POSITIONS + positions, 0.5)

    same = null_test(lambda x, *_: x, z, zl, zp, 1, POSITIONS, 64, torch.Generator().manual_seed(0))
    shrunk = null_test(shrink, z, zl, zp, 1, POSITIONS, 64, torch.Generator().manual_seed(0))
    assert same.moved == 0.0 and same.passes
    assert not shrunk.passes and shrunk.ratio > 0.15 and shrunk.dispersion_after < 0.9


def test_flow_claims_need_ten_steps_and_can_fail() -> None:
    rng = np.random.default_rng(0)
    j = np.arange(11)[:, None]
    contracting = 0.5 + 2.0 * 0.6**j + rng.normal(0, 0.002, (11, 51))
    rising = 1.0 + 0.05 * j + rng.normal(0, 0.002, (11, 51))
    good, bad = flow_claims(contracting), flow_claims(rising)
    assert good["monotone"] == "holds" and good["contraction"] == "holds"
    assert good["fit"]["beta"] == pytest.approx(0.6, abs=0.02) and good["fit"]["floor"] == pytest.approx(0.5, abs=0.02)
    assert bad["monotone"] == "does not hold" and bad["contraction"] == "does not hold"
    assert flow_claims(contracting[:6])["monotone"] == "not measurable"


def test_sinkhorn_report_never_says_a_collapse_holds(tmp_path: Path) -> None:
    step = {"step": 1, "num_conditions": 80, "trivial": False, "blur": 0.2, "divergence_before": 2.0,
            "divergence_after": 1.0,
            "ratio_before": {"ratio": 1.0, "se": 0.05, "state": "consistent"},
            "ratio_after": {"ratio": 0.4, "se": 0.05, "state": "collapsed"}}
    stats = {"steps": [step], "ratio_before": step["ratio_before"], "ratio_after": step["ratio_after"],
             "reduction": {"estimate": -1.0, "low": -1.2, "high": -0.8, "num_pairs": 40, "verdict": "holds"},
             "relative_reduction": 0.5, "verdict": "collapse", "null": {}, "flow": None}
    text = sinkhorn_section({"stage": "test", "global_step": 0, "num_samples": 40, "num_batches": 1,
                             "bootstrap": 10, "modes": {"flow": stats}}, tmp_path)
    assert "does not hold: collapse" in text and "**holds**" not in text
