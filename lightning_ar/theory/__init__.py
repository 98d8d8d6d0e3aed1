"""Checks of the paper's theoretical claims (SPEC 2.2): curve fits, measured quantities, plots and the report.

Plain NumPy/SciPy/torch/matplotlib; the Lightning callbacks that drive them live in
:mod:`lightning_ar.callbacks.theory`.
"""

from lightning_ar.theory.bootstrap import Replicates, estimate, verdict
from lightning_ar.theory.condition_errors import ConditionModel, oracle_trace, teacher_forced_trace
from lightning_ar.theory.fits import DecayFit, fit_contraction, fit_exponential_decay
from lightning_ar.theory.ground_truth import StepTruth, exact_trace, gaussian_kl, step_truth, trace_truth
from lightning_ar.theory.measures import ScoreNorms, SinkhornCurves, score_norms, sinkhorn_curves
from lightning_ar.theory.oracle import OracleSettings, oracle_conditions
from lightning_ar.theory.report import write_theory_report
from lightning_ar.theory.score_truth import score_truth
from lightning_ar.theory.truth_run import TruthSettings, evaluate_cdm, evaluate_controls, evaluate_generator

__all__ = [
    "ConditionModel",
    "DecayFit",
    "OracleSettings",
    "Replicates",
    "StepTruth",
    "TruthSettings",
    "ScoreNorms",
    "SinkhornCurves",
    "fit_contraction",
    "fit_exponential_decay",
    "score_norms",
    "sinkhorn_curves",
    "write_theory_report",
    "estimate",
    "evaluate_cdm",
    "evaluate_controls",
    "evaluate_generator",
    "exact_trace",
    "gaussian_kl",
    "oracle_conditions",
    "oracle_trace",
    "score_truth",
    "step_truth",
    "teacher_forced_trace",
    "trace_truth",
    "verdict",
]
