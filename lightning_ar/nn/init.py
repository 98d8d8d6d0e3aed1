"""MAR's weight initialisation, shared by the transformers and the heads (in place, in module order)."""

from __future__ import annotations

from torch import nn


def xavier_linears_(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every ``nn.Linear`` inside ``module`` (in ``modules()`` order)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def normal_embeddings_(*params: nn.Parameter, std: float = 0.02) -> None:
    """Draw each of ``params`` (embeddings, positional embeddings, mask tokens) from ``N(0, std^2)``, in order."""
    for p in params:
        nn.init.normal_(p, std=std)
