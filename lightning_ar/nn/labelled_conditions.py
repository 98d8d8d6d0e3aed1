"""Conditions with the class label and token position of each: what transport between condition clouds groups by."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LabelledConditions(NamedTuple):
    """Conditions with the class label and token position of each (a tuple: ``z, labels, positions = ...``).

    Attributes:
        conditions: ``[N, D]`` conditions.
        labels: ``[N]`` class labels.
        positions: ``[N]`` token positions.
    """

    conditions: Tensor
    labels: Tensor
    positions: Tensor

    def groups(self, seq_len: int) -> Tensor:
        """``[N]`` (class, position) group ids ``label * seq_len + position``."""
        return self.labels * seq_len + self.positions

    def to(self, device: torch.device | str) -> LabelledConditions:
        """The same conditions, labels and positions on ``device``."""
        return LabelledConditions(*(t.to(device) for t in self))
