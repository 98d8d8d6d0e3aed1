"""Checks of the paper's theoretical claims (SPEC 2.2): curve fits, measured quantities, plots and the report.

Plain NumPy/SciPy/torch/matplotlib; the Lightning callbacks that drive them live in
:mod:`lightning_ar.callbacks.theory`.
"""

from lightning_ar.theory.fits import DecayFit, fit_contraction, fit_exponential_decay
from lightning_ar.theory.measures import ScoreNorms, SinkhornCurves, score_norms, sinkhorn_curves
from lightning_ar.theory.report import write_theory_report

__all__ = [
    "DecayFit",
    "ScoreNorms",
    "SinkhornCurves",
    "fit_contraction",
    "fit_exponential_decay",
    "score_norms",
    "sinkhorn_curves",
    "write_theory_report",
]
