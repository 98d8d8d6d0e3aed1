"""Masking utilities: the training mask ratio, per-sample random orders and the cosine reveal schedule.

All randomness comes from an explicit ``torch.Generator`` (or the global RNG when ``None``) and every tensor is
created on the requested device, so a seed reproduces a mask on any device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sample_mask_ratio(
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    mean: float = 1.0,
    std: float = 0.25,
    low: float = 0.7,
    high: float = 1.0,
) -> float:
    """Draw one mask ratio from a normal(mean, std) truncated to ``[low, high]`` (MAR's training schedule).

    ``low = 0`` is allowed: :func:`num_masked_for_training` still masks at least one token."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask ratio bounds must satisfy 0 <= low <= high <= 1, got low={low}, high={high}")
    ratio = torch.empty(1, device=device)
    torch.nn.init.trunc_normal_(ratio, mean=mean, std=std, a=low, b=high, generator=generator)
    return float(ratio.item())


def random_orders(
    batch_size: int, seq_len: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """A random permutation of the ``seq_len`` positions for each sample.

    Returns:
        Long tensor ``[batch_size, seq_len]``; row ``b`` lists positions in generation order.
    """
    noise = torch.rand(batch_size, seq_len, generator=generator, device=device)
    return noise.argsort(dim=1)


def mask_from_orders(orders: Tensor, num_masked: int) -> Tensor:
    """Mask the first ``num_masked`` positions of each order.

    MAR's convention: the *leading* entries of an order stay masked longest; the trailing ones are revealed first.

    Args:
        orders: ``[B, L]`` permutations.
        num_masked: number of masked positions per row, ``0 <= num_masked <= L``.

    Returns:
        Bool tensor ``[B, L]``, ``True`` at masked positions.
    """
    batch, seq_len = orders.shape
    if not 0 <= num_masked <= seq_len:
        raise ValueError(f"num_masked must be in [0, {seq_len}], got {num_masked}")
    mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=orders.device)
    return mask.scatter_(1, orders[:, :num_masked], True)


def num_masked_for_training(seq_len: int, ratio: float) -> int:
    """Number of masked tokens for a training mask ratio (``ceil(L * ratio)``, at least one)."""
    return max(1, min(seq_len, math.ceil(seq_len * ratio)))


def cosine_schedule(seq_len: int, num_iter: int) -> list[int]:
    """How many tokens remain masked after each of the ``num_iter`` sampling steps.

    MAR's rule: ``mask_len = floor(L * cos(pi/2 * (k+1)/num_iter))`` clamped to ``[1, remaining-1]``, and zero after
    the last step. The lower clamp is raised to ``num_iter - 1 - k`` so that every step reveals at least one token
    (MAR's rule alone can leave a step with nothing to predict when ``num_iter`` is close to ``L``).

    Returns:
        List of length ``num_iter``; entry ``k`` is the number still masked after step ``k`` (the last is 0).
    """
    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter must be in [1, {seq_len}] (the sequence length), got {num_iter}")
    remaining, schedule = seq_len, []
    for k in range(num_iter):
        if k == num_iter - 1:
            remaining = 0
        else:
            target = math.floor(seq_len * math.cos(math.pi / 2.0 * (k + 1) / num_iter))
            remaining = max(num_iter - 1 - k, min(remaining - 1, target))
        schedule.append(remaining)
    return schedule


def bucket_masked_count(num_masked: int, seq_len: int, fewest: int, buckets: int | None) -> int:
    """``num_masked`` moved to the nearest of ``buckets`` evenly spaced counts in ``[fewest, seq_len]``.

    Training with a fixed set of masked counts gives a compiled step a fixed set of shapes (one graph each, no
    recompiles after them). ``buckets=None``, or at least as many buckets as counts in the range: unchanged.

    Args:
        num_masked: The count drawn for this batch, in ``[fewest, seq_len]``.
        seq_len: Tokens per sequence ``L``.
        fewest: The smallest count training draws (:func:`num_masked_for_training` at the lowest ratio).
        buckets: How many distinct counts to allow (``>= 1``).
    """
    if buckets is None or buckets >= seq_len - fewest + 1:
        return num_masked
    if buckets < 1:
        raise ValueError(f"the number of mask-count buckets must be >= 1, got {buckets}")
    if buckets == 1:
        return seq_len
    levels = [round(fewest + i * (seq_len - fewest) / (buckets - 1)) for i in range(buckets)]
    return min(levels, key=lambda level: (abs(level - num_masked), -level))
