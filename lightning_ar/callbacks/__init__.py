"""Callbacks: ADM .npz gathering, sample metrics and tables, sample grids, prediction writer, theory monitors,
non-finite loss policy, and the ``batch_size_fn`` of Lightning's ``ThroughputMonitor``."""

from lightning_ar.callbacks.adm_npz import AdmNpzWriter, gather_adm_npz
from lightning_ar.callbacks.generation_metrics import GenerationMetrics
from lightning_ar.callbacks.nonfinite import NonFiniteLoss, NonFiniteLossError
from lightning_ar.callbacks.sample_grid import SampleGrid
from lightning_ar.callbacks.sample_writer import SampleWriter
from lightning_ar.callbacks.theory import ConditionalScoreNormMonitor, SinkhornDivergenceMonitor
from lightning_ar.callbacks.throughput import batch_size

__all__ = [
    "AdmNpzWriter",
    "ConditionalScoreNormMonitor",
    "GenerationMetrics",
    "NonFiniteLoss",
    "NonFiniteLossError",
    "SampleGrid",
    "SampleWriter",
    "SinkhornDivergenceMonitor",
    "batch_size",
    "gather_adm_npz",
]
