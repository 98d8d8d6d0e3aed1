"""Theory checks: curve fits against known curves, the two monitors on tiny models, the report."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY, save_generator_checkpoint
from lightning.pytorch.callbacks import Callback

from lightning_ar import LatentDataModule, MARGenerator, OTRefinement
from lightning_ar.callbacks import ConditionalScoreNormMonitor, SinkhornDivergenceMonitor
from lightning_ar.nn import DiffusionLoss, GenerationTrace
from lightning_ar.theory import (
    fit_contraction,
    fit_exponential_decay,
    score_norms,
    sinkhorn_curves,
    write_theory_report,
)

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
              "theory/score_norm_exp_better", "theory/guidance_norm_first", "theory/guidance_norm_last"]


def test_score_monitor_logs_plots_reports_and_restores_train_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = LatentDataModule("digits", batch_size=16)
    model = MARGenerator(dm.latent_shape, dm.num_classes, dm.latent_scale, **TINY)
    monitor = ConditionalScoreNormMonitor(num_per_class=1, cfg=2.0, timesteps=(100, 900), classes=[0, 1, 2])
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
    assert "Theorem 2" in report and ("**holds**" in report or "**does not hold**" in report)
    assert "theory/score_norm_val.png" in report and "Sinkhorn" not in report


def test_score_monitor_keys_reach_callback_metrics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = LatentDataModule("digits", batch_size=16)
    model = MARGenerator(dm.latent_shape, dm.num_classes, dm.latent_scale, **TINY)
    monitor = ConditionalScoreNormMonitor(num_per_class=1, cfg=2.0, timesteps=(500,), classes=[3], plot=False)
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
    monitor = SinkhornDivergenceMonitor(num_per_class=4)
    score = ConditionalScoreNormMonitor(num_per_class=1, timesteps=(500,), plot=False,
                                        generate_kwargs={"refine": "none"})
    trainer = _trainer(tmp_path, [monitor, score], limit_test_batches=1)
    trainer.test(module, dm, verbose=False)
    keys = ["theory/sinkhorn_before_mean", "theory/sinkhorn_after_mean", "theory/sinkhorn_reduction",
            "theory/flow_fraction_monotone", "theory/flow_rho", "theory/flow_rho_bound"]
    assert set(keys) <= set(trainer.callback_metrics)
    flow = monitor.last["modes"]["flow"]
    assert len(flow["before"]) == TINY["num_iter"] and all(len(tr) == 4 for tr in flow["flow_traces"])
    assert 0.0 <= trainer.callback_metrics["theory/flow_fraction_monotone"] <= 1.0
    assert (tmp_path / "theory" / "sinkhorn_test.png").stat().st_size > 0
    report = (tmp_path / "theory_report.md").read_text()
    assert "Theorem 2" in report and "Sinkhorn divergence of the conditions" in report


def test_report_concatenates_existing_sections(tmp_path: Path) -> None:
    fit = fit_exponential_decay(STEPS[:5], 2.0 * 0.5 ** STEPS[:5] + 1.0).to_dict()
    score = {"stage": "test", "global_step": 0, "num_samples": 4, "cfg": 1.0, "fit": fit, "plot": None,
             "norms": {"timesteps": [500], "score": [[v] for v in 2.0 * 0.5 ** STEPS[:5] + 1.0],
                       "score_mean": list(2.0 * 0.5 ** STEPS[:5] + 1.0), "guidance": None, "guidance_mean": None}}
    path = write_theory_report(tmp_path, score=score)
    text = path.read_text()
    assert path == tmp_path / "theory_report.md" and "**holds**" in text and "Sinkhorn" not in text
    assert write_theory_report(tmp_path).read_text() == text  # no new section: the existing one is kept
