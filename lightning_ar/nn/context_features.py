"""Low-dimensional features of a token's revealed context, for the context-aware entropic map (issue 15, item 2).

A token's ideal condition depends on its revealed context, not only on its (class, position); transport on
(class, position) alone cannot correct a condition that is right in distribution but wrong for its context (the
``ContextShuffle`` control). The feature of a token at position ``p`` is the distance-weighted mean of the revealed
token values,

    phi_p = sum_q w_pq x_q / sum_q w_pq,    w_pq = revealed_q * exp(-d(p, q) / length_scale),

``[token_dim]`` per token (0 where nothing is revealed), with ``d`` the distance between token positions: ``raster``
(``|p - q|`` in raster order, the metric of the ``gmm`` source's AR(1) covariance) or ``grid`` (Euclidean distance
on the square token grid of an image). It is a fixed function of the context (no parameters to fit): the same for
the generator's own contexts (sampling) and for real ones (teacher forcing, the map's target).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

ContextMetric = Literal["raster", "grid"]
CONTEXT_METRICS = ("raster", "grid")


def token_coordinates(seq_len: int, metric: ContextMetric, device: torch.device | str = "cpu") -> Tensor:
    """``[L, 2]`` coordinates of the token positions under ``metric`` (``grid`` needs a square ``L``)."""
    if metric not in CONTEXT_METRICS:
        raise ValueError(f"context metric must be one of {CONTEXT_METRICS}, got {metric!r}")
    idx = torch.arange(seq_len, device=device, dtype=torch.float32)
    if metric == "raster":
        return torch.stack([idx, torch.zeros_like(idx)], dim=1)
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"context metric 'grid' needs a square number of tokens, got L={seq_len}")
    return torch.stack([idx // side, idx % side], dim=1)


def revealed_context(tokens: Tensor, revealed: Tensor, positions: Tensor, length_scale: float = 1.0,
                     metric: ContextMetric = "raster") -> Tensor:
    """Distance-weighted mean of the revealed tokens seen from each queried position (module docstring).

    Args:
        tokens: ``[B, L, T]`` token values (only revealed entries are read).
        revealed: ``[B, L]`` bool, the revealed positions.
        positions: ``[B, n]`` queried positions (the tokens a step predicts).
        length_scale: Decay length of the weights (> 0), in position units.
        metric: ``raster`` or ``grid`` (see the module docstring).

    Returns:
        ``[B, n, T]`` features in ``tokens``' dtype (zeros where a sample has nothing revealed).
    """
    if not length_scale > 0:
        raise ValueError(f"context length_scale must be > 0, got {length_scale}")
    coords = token_coordinates(tokens.shape[1], metric, tokens.device)  # (L, 2)
    dist = torch.cdist(coords[positions.long()], coords[None].expand(positions.shape[0], -1, -1))  # (B, n, L)
    weights = torch.exp(-dist / length_scale) * revealed[:, None, :].float()  # (B, n, L)
    total = weights.sum(-1, keepdim=True)  # (B, n, 1)
    feats = weights @ tokens.float() / total.clamp_min(1e-30)  # (B, n, T)
    return torch.where(total > 0, feats, torch.zeros_like(feats)).to(tokens.dtype)


class ContextSpec:
    """How a token's context feature is computed: the decay length and metric of :func:`revealed_context`.

    Args:
        length_scale: Decay length of the weights (> 0), in position units.
        metric: ``raster`` (the ``gmm`` source's) or ``grid`` (square image token grids).
    """

    def __init__(self, length_scale: float = 1.0, metric: ContextMetric = "raster") -> None:
        if not length_scale > 0:
            raise ValueError(f"context length_scale must be > 0, got {length_scale}")
        if metric not in CONTEXT_METRICS:
            raise ValueError(f"context metric must be one of {CONTEXT_METRICS}, got {metric!r}")
        self.length_scale, self.metric = float(length_scale), metric

    def __repr__(self) -> str:
        return f"ContextSpec(length_scale={self.length_scale}, metric={self.metric!r})"

    def __call__(self, tokens: Tensor, revealed: Tensor, positions: Tensor) -> Tensor:
        """Features ``[B * n, T]`` of the tokens at ``positions`` ``[B, n]`` given ``tokens`` ``[B, L, T]`` revealed
        at ``revealed`` ``[B, L]``, flattened in the samplers' order (sample-major)."""
        feats = revealed_context(tokens, revealed, positions, self.length_scale, self.metric)  # (B, n, T)
        return feats.reshape(-1, feats.shape[-1])
