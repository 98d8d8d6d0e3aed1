"""Ideal conditions by teacher forcing on real data (this project's estimate of ``P_c*``, SPEC section 2.3).

For AR step ``k`` of the sampling schedule, reveal exactly the tokens that would be known before step ``k`` (a
random order per sample, *real* token values), run the frozen transformer, and keep the conditions of the tokens
that step ``k`` predicts. These are the conditions the model produces when its context carries no generation error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ar.nn.context_features import ContextSpec
from lightning_ar.nn.mar import MaskedAutoregressiveTransformer
from lightning_ar.nn.masking import mask_from_orders


@dataclass
class StepConditions:
    """Conditions of the tokens predicted at one AR step, flattened over the batch (``N = B * n``).

    Attributes:
        conditions: ``[N, D]``.
        labels: ``[N]`` class labels.
        positions: ``[N]`` token positions.
        context: ``[N, Fc]`` context features of the real revealed context (``None`` unless asked for).
    """

    conditions: Tensor
    labels: Tensor
    positions: Tensor
    context: Tensor | None = None


def masked_before(schedule: list[int], step: int, seq_len: int) -> int:
    """Number of tokens still masked when AR step ``step`` starts (``schedule`` from :func:`cosine_schedule`)."""
    return seq_len if step == 0 else schedule[step - 1]


@torch.no_grad()
def teacher_forced_conditions(
    mar: MaskedAutoregressiveTransformer,
    tokens: Tensor,
    labels: Tensor,
    schedule: list[int],
    step: int,
    generator: torch.Generator | None = None,
    context: ContextSpec | None = None,
) -> StepConditions:
    """Ideal conditions of AR step ``step`` for a batch of real token sequences.

    Args:
        mar: The frozen transformer (call in eval mode).
        tokens: ``[B, L, token_dim]`` real tokens.
        labels: ``[B]`` their class labels.
        schedule: Tokens still masked after each step (:func:`~lightning_ar.nn.masking.cosine_schedule`).
        step: AR step ``k``.
        generator: RNG of the random orders.
        context: Also compute each condition's context feature from the real revealed tokens.

    Returns:
        The conditions of the ``masked_before(k) - schedule[k]`` tokens per sample that step ``k`` predicts.
    """
    b, seq_len = tokens.shape[:2]
    orders = mar.generation_orders(b, tokens.device, generator)  # (B, L): random (MAR) or the fixed causal order
    before, after = masked_before(schedule, step, seq_len), schedule[step]
    mask = mask_from_orders(orders, before)  # (B, L): what is unknown before step k
    z = mar(tokens, mask, labels)  # (B, L, D)
    positions = orders[:, after:before]  # (B, n): masked before k, revealed by k
    cond = z.gather(1, positions[..., None].expand(-1, -1, z.shape[-1]))  # (B, n, D)
    n = positions.shape[1]
    feats = context(tokens, ~mask, positions) if context is not None else None  # (B*n, Fc)
    return StepConditions(cond.reshape(b * n, -1), labels.repeat_interleave(n), positions.reshape(-1), feats)
