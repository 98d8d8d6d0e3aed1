"""Plain PyTorch modules (no Lightning): transformer, diffusion head and loss, masking, sampler, trace."""

from lightning_ar.nn.controls import ConditionStats, ContextShuffle, Dispersion, MeanBias
from lightning_ar.nn.diffusion_head import AdaLNMLPDenoiser
from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.mar import MaskedAutoregressiveTransformer, patchify, unpatchify
from lightning_ar.nn.masking import cosine_schedule, mask_from_orders, random_orders, sample_mask_ratio
from lightning_ar.nn.sampler import ConditionRefiner, sample_tokens
from lightning_ar.nn.sampling_options import SAMPLERS, SamplingOptions
from lightning_ar.nn.sampling_run import SamplingRun
from lightning_ar.nn.trace import GenerationTrace, StepRecord
from lightning_ar.nn.transformer_spec import TransformerSpec

__all__ = [
    "SAMPLERS",
    "AdaLNMLPDenoiser",
    "ConditionRefiner",
    "ConditionStats",
    "ContextShuffle",
    "DiffusionLoss",
    "Dispersion",
    "GenerationTrace",
    "MaskedAutoregressiveTransformer",
    "MeanBias",
    "SamplingOptions",
    "SamplingRun",
    "StepRecord",
    "TransformerSpec",
    "cosine_schedule",
    "mask_from_orders",
    "patchify",
    "random_orders",
    "sample_mask_ratio",
    "sample_tokens",
    "unpatchify",
]
