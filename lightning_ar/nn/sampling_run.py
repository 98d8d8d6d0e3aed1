"""What one sampling call carries besides its options: its randomness, what it records, what may move its conditions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the samplers import this module
    from lightning_ar.nn.sampler import ConditionRefiner
    from lightning_ar.nn.trace import GenerationTrace


@dataclass(frozen=True)
class SamplingRun:
    """The per-call companions of :class:`~lightning_ar.nn.sampling_options.SamplingOptions` in every sampler.

    Attributes:
        generator: RNG on the labels' device, for orders and all noise (``None``: the global RNG).
        trace: Filled with one record per AR step when given.
        refiner: Hook applied to the conditions of every AR step (e.g. the OT refinement).
        progress: Show a progress bar over AR steps.
    """

    generator: torch.Generator | None = None
    trace: GenerationTrace | None = None
    refiner: ConditionRefiner | None = None
    progress: bool = False
