"""The evaluator interface: scores generated latents of one data source against its real data."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class SampleEvaluator(nn.Module, ABC):
    """Accumulates generated latents and reports sample-quality metrics.

    Lifecycle: ``prepare(device)`` once (builds feature extractors, real statistics; may train or load a cached
    model), then per evaluation ``reset()``, ``update(...)`` for each generated batch, ``compute()``. ``reference()``
    gives the real-vs-real floors of the same metrics, so that a number can be read against what real data gets.
    In distributed runs the accumulated states are reduced across processes by ``compute`` (torchmetrics).
    """

    @abstractmethod
    def prepare(self, device: torch.device) -> None:
        """Build whatever the metrics need and move to ``device`` (idempotent)."""

    @abstractmethod
    def update(self, latents: Tensor, labels: Tensor) -> None:
        """Add generated latents ``[B, C, H, W]`` (VAE space, unscaled) conditioned on ``labels`` ``[B]``."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Metrics of everything added since the last ``reset`` (keys without a stage prefix, e.g. ``fid``)."""

    @abstractmethod
    def reference(self) -> dict[str, float]:
        """Real-vs-real floors, keys named like ``compute``'s with a ``_floor`` suffix (e.g. ``fid_floor``)."""

    @abstractmethod
    def reset(self) -> None:
        """Forget generated samples (real statistics are kept)."""
