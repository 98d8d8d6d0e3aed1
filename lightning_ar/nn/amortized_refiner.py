"""``AmortizedRefiner``: the learned per-condition correction (one MLP pass per AR step)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AmortizedRefiner(nn.Module):
    """Learned residual refiner ``R(c, k, y) = c + MLP([LayerNorm(c), step_emb(k), class_emb(y)])``.

    The output layer is zero-initialised, so a fresh refiner is exactly the identity.
    """

    def __init__(self, dim: int, num_steps: int, num_classes: int, hidden: int = 256, depth: int = 2) -> None:
        """Build the refiner.

        Args:
            dim: Condition dimension ``D``.
            num_steps: Number of AR steps (size of the step embedding table).
            num_classes: Number of classes (size of the class embedding table).
            hidden: Width of the MLP and of the embeddings.
            depth: Number of hidden layers of the MLP (>= 1).
        """
        super().__init__()
        for name, value in (("dim", dim), ("num_steps", num_steps), ("num_classes", num_classes),
                            ("hidden", hidden), ("depth", depth)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_steps = num_steps
        self.norm = nn.LayerNorm(dim)
        self.step_emb = nn.Embedding(num_steps, hidden)
        self.class_emb = nn.Embedding(num_classes, hidden)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(dim + 2 * hidden if i == 0 else hidden, hidden), nn.SiLU()]
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor, labels: Tensor, step: int | Tensor) -> Tensor:
        """Refine ``z`` ``[N, D]`` of classes ``labels`` ``[N]`` at AR ``step`` (int or ``[N]``) -> ``[N, D]``."""
        if isinstance(step, int):
            if not 0 <= step < self.num_steps:
                raise ValueError(f"step must be in [0, {self.num_steps - 1}], got {step}")
            step = torch.full_like(labels, step)
        h = torch.cat([self.norm(z), self.step_emb(step.long()), self.class_emb(labels.long())], dim=1)  # (N, D+2H)
        return z + self.out(self.mlp(h))  # (N, D)
