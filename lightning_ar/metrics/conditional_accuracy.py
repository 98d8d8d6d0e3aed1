"""Conditional accuracy: the fraction of generated samples that a classifier assigns to their conditioning label."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class ConditionalAccuracy(Metric):
    """Conditional accuracy: fraction of generated samples classified as their conditioning label.

    ``update`` takes a classifier's scores ``[B, K]`` (logits or probabilities; the argmax is the prediction) or
    predicted classes ``[B]``, and the labels ``[B]`` the samples were generated for. Counts are summed across
    processes in distributed runs. ``compute`` gives ``nan`` when nothing was added.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _predictions(preds: Tensor, labels: Tensor) -> Tensor:
        """Predicted classes ``[B]`` from scores ``[B, K]`` or classes ``[B]``; checks the shapes against labels."""
        if labels.ndim != 1:
            raise ValueError(f"ConditionalAccuracy expects labels [B], got {tuple(labels.shape)}")
        if preds.ndim not in (1, 2) or preds.shape[0] != labels.shape[0]:
            raise ValueError(
                f"ConditionalAccuracy expects scores [B, K] or classes [B] with B={labels.shape[0]} like the labels, "
                f"got {tuple(preds.shape)}"
            )
        return preds.argmax(-1) if preds.ndim == 2 else preds

    def update(self, preds: Tensor, labels: Tensor) -> None:
        """Add scores ``[B, K]`` or predicted classes ``[B]`` of samples generated for ``labels`` ``[B]``."""
        hits = self._predictions(preds, labels).to(labels.device) == labels  # (B,)
        self.correct += hits.sum().to(self.correct.device)
        self.total += hits.numel()

    def compute(self) -> Tensor:
        """Fraction (float scalar) of added samples predicted as their conditioning label."""
        if self.total == 0:
            return torch.tensor(float("nan"), device=self.correct.device)
        return self.correct.float() / self.total
