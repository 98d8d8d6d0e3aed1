"""Checks of the paper's theoretical claims (SPEC 2.2-2.3): curve fits, measured quantities, condition statistics that
see collapse, paired verdicts with bootstrap CIs, plots and the report.

Plain NumPy/SciPy/torch/matplotlib; the Lightning callbacks that drive them live in
:mod:`lightning_ar.callbacks.theory`.
"""

from lightning_ar.theory.bootstrap import Replicates, estimate
from lightning_ar.theory.condition_errors import ConditionModel, oracle_trace, teacher_forced_trace
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
from lightning_ar.theory.ground_truth import StepTruth, exact_trace, gaussian_kl, step_truth, trace_truth
from lightning_ar.theory.grouped_sinkhorn import group_clouds, grouped_divergence
from lightning_ar.theory.measures import ScoreNorms, SinkhornCurves, score_norms, sinkhorn_curves
from lightning_ar.theory.oracle import OracleSettings, oracle_conditions
from lightning_ar.theory.report import write_theory_report
from lightning_ar.theory.score_truth import score_truth
from lightning_ar.theory.stats import PairedComparison, bootstrap_ci, paired_difference, verdict
from lightning_ar.theory.truth_run import TruthSettings, evaluate_cdm, evaluate_controls, evaluate_generator

__all__ = [
    "ConditionModel",
    "DecayFit",
    "Dispersion",
    "DispersionRatio",
    "NullTest",
    "OracleSettings",
    "PairedComparison",
    "Replicates",
    "ScoreNorms",
    "SinkhornCurves",
    "StepPool",
    "StepTruth",
    "TruthSettings",
    "bootstrap_ci",
    "condition_statistics",
    "decay_claim",
    "dispersion_ratio",
    "estimate",
    "evaluate_cdm",
    "evaluate_controls",
    "evaluate_generator",
    "exact_trace",
    "fit_contraction",
    "fit_exponential_decay",
    "flow_claims",
    "gaussian_kl",
    "group_clouds",
    "grouped_divergence",
    "null_test",
    "oracle_conditions",
    "oracle_trace",
    "paired_difference",
    "pool_steps",
    "pooled_dispersion",
    "refinement_verdict",
    "score_norms",
    "score_truth",
    "sinkhorn_curves",
    "step_truth",
    "teacher_forced_trace",
    "trace_truth",
    "verdict",
    "write_theory_report",
]
