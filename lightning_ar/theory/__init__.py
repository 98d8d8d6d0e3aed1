"""Checks of the paper's theoretical claims (SPEC 2.2-2.3): curve fits, measured quantities, condition statistics that
see collapse, paired verdicts with bootstrap CIs, plots and the report.

Plain NumPy/SciPy/torch/matplotlib; the Lightning callbacks that drive them live in
:mod:`lightning_ar.callbacks.theory`.
"""

from lightning_ar.theory.conditions import StepPool, condition_statistics, pool_steps, refinement_verdict
from lightning_ar.theory.dispersion import (
    Dispersion,
    DispersionRatio,
    NullTest,
    dispersion_ratio,
    null_test,
    pooled_dispersion,
)
from lightning_ar.theory.fits import DecayFit, decay_claim, fit_contraction, fit_exponential_decay
from lightning_ar.theory.flow_claims import flow_claims
from lightning_ar.theory.grouped_sinkhorn import group_clouds, grouped_divergence
from lightning_ar.theory.measures import ScoreNorms, SinkhornCurves, score_norms, sinkhorn_curves
from lightning_ar.theory.report import write_theory_report
from lightning_ar.theory.stats import PairedComparison, bootstrap_ci, paired_difference, verdict

__all__ = [
    "DecayFit",
    "Dispersion",
    "DispersionRatio",
    "NullTest",
    "PairedComparison",
    "ScoreNorms",
    "SinkhornCurves",
    "StepPool",
    "bootstrap_ci",
    "condition_statistics",
    "decay_claim",
    "dispersion_ratio",
    "fit_contraction",
    "fit_exponential_decay",
    "flow_claims",
    "group_clouds",
    "grouped_divergence",
    "null_test",
    "paired_difference",
    "pool_steps",
    "pooled_dispersion",
    "refinement_verdict",
    "score_norms",
    "sinkhorn_curves",
    "verdict",
    "write_theory_report",
]
