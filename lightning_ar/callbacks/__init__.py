"""Callbacks: sample metrics and results tables, sample grids, prediction writer."""

from lightning_ar.callbacks.generation_metrics import GenerationMetrics
from lightning_ar.callbacks.sample_grid import SampleGrid
from lightning_ar.callbacks.sample_writer import SampleWriter

__all__ = ["GenerationMetrics", "SampleGrid", "SampleWriter"]

from lightning_ar.callbacks.theory import ConditionalScoreNormMonitor, SinkhornDivergenceMonitor  # noqa: E402

__all__ += ["ConditionalScoreNormMonitor", "SinkhornDivergenceMonitor"]
