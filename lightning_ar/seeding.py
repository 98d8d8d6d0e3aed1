"""How the package derives its seeded random streams: ``seed * stride + stream`` (:func:`seeded_generator`), or
numpy's SeedSequence where the parts are unbounded (:func:`step_seeds`: training steps and ranks)."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(seed: int, stream: int = 0, *, stride: int = 1,
                     device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed * stride + stream``.

    Each user keeps its own ``stride`` (a prime larger than its stream count, e.g. 7919 for the flow's AR steps), so
    that the streams of different seeds do not collide and every recorded figure keeps its seeds.

    Args:
        seed: The configured seed.
        stream: Index of the stream (AR step, batch, rank, ...), in ``[0, stride)``.
        stride: Seeds apart of consecutive ``seed`` values.
        device: Device of the generator (that of the tensors it draws).
    """
    return torch.Generator(device).manual_seed(int(seed) * int(stride) + int(stream))


def step_seeds(seed: int, step: int, rank: int, count: int = 2) -> list[int]:
    """``count`` independent 63-bit seeds determined by ``(seed, step, rank)`` (numpy's SeedSequence mixes them)."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(count, dtype=np.uint64)
    return [int(s) >> 1 for s in state]
