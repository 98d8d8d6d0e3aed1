"""lightning-ar: masked autoregressive image generation with a per-token diffusion loss, as Lightning modules."""

from lightning_ar.callbacks import (
    ConditionalScoreNormMonitor,
    GenerationMetrics,
    SampleGrid,
    SampleWriter,
    SinkhornDivergenceMonitor,
)
from lightning_ar.data import DigitsSource, GMMSource, LatentDataModule, LatentSource
from lightning_ar.modules import MARGenerator, OTRefinement
from lightning_ar.nn import DiffusionLoss, GenerationTrace, MaskedAutoregressiveTransformer, StepRecord
from lightning_ar.nn.refine import AmortizedRefiner, ConditionBank, RefinementResult, refine_conditions, sinkhorn_flow

__version__ = "0.1.0"

__all__ = [
    "AmortizedRefiner",
    "ConditionBank",
    "ConditionalScoreNormMonitor",
    "SinkhornDivergenceMonitor",
    "OTRefinement",
    "RefinementResult",
    "refine_conditions",
    "sinkhorn_flow",
    "DiffusionLoss",
    "DigitsSource",
    "GMMSource",
    "GenerationMetrics",
    "GenerationTrace",
    "LatentDataModule",
    "LatentSource",
    "MARGenerator",
    "MaskedAutoregressiveTransformer",
    "SampleGrid",
    "SampleWriter",
    "StepRecord",
]
