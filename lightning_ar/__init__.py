"""lightning-ar: masked autoregressive image generation with a per-token diffusion loss, as Lightning modules."""

from lightning_ar.callbacks import GenerationMetrics, SampleGrid, SampleWriter
from lightning_ar.data import DigitsSource, GMMSource, LatentDataModule, LatentSource
from lightning_ar.modules import MARGenerator
from lightning_ar.nn import DiffusionLoss, GenerationTrace, MaskedAutoregressiveTransformer, StepRecord

__version__ = "0.1.0"

__all__ = [
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
